"""The two sides of every op agree: Python's ``polarprune::`` schemas and the C++ ``polarprune_C::`` ones.

Pure text parsing of csrc/ (no GPU, no compiled extension): the ``m.def`` schemas
of registration.cpp against the registered Python schemas, the ``m.impl`` list
and the host declarations of gate_ops.h against the op list, the STE and
polarization codes of gate_codes.h against ``common.STE_CODES`` /
``common.POLAR_CODES``, and every op in the ``polarprune`` namespace. Each
check is a function returning its problems, and each is run once more on an
edited copy of the C++ text to show that a one-sided edit is caught. Each
provider's arguments against one op's schema (the reference's, Triton's, and
the loaded extension's own schema) are checked in that op's file
(tests/ops/test_<op>.py: test_implements_the_schema).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from polarprune_cuda.ops import common, functional, reference

CSRC = Path(__file__).resolve().parents[2] / "csrc"
REGISTRATION = (CSRC / "registration.cpp").read_text()
HOST_DECLS = (CSRC / "gate_ops.h").read_text()
CODES = (CSRC / "gate_codes.h").read_text()
TRITON_COMMON = (CSRC.parent / "kernels" / "_common.py").read_text()

# schema type -> C++ parameter type of the host function (gate_ops.h)
CPP_PARAM = {"Tensor": "const at::Tensor&", "str": "c10::string_view", "float": "double", "int": "int64_t"}


def _strip_comments(text: str) -> str:
    return re.sub(r"//[^\n]*", "", re.sub(r"/\*.*?\*/", "", text, flags=re.S))


def _block(text: str, head: str) -> str:
    """The body of ``head { ... }`` (braces balanced)."""
    text = _strip_comments(text)
    start = text.index(head)
    i = text.index("{", start)
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1: j]
    raise AssertionError(f"unbalanced braces after {head!r}")


def cpp_schemas(registration: str) -> dict[str, torch.FunctionSchema]:
    """name -> parsed schema of every ``m.def("...")`` in ``TORCH_LIBRARY(polarprune_C, m)``."""
    body = _block(registration, "TORCH_LIBRARY(polarprune_C, m)")
    out = {}
    for call in re.finditer(r'm\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)\)', body):
        text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call.group(1)))
        schema = torch._C.parse_schema(f"polarprune_C::{text}")
        name = schema.name.split("::")[1]
        assert name not in out, f"polarprune_C::{name} defined twice"
        out[name] = schema
    return out


def cpp_impls(registration: str) -> dict[str, str]:
    """op name -> C++ function of every ``m.impl`` in ``TORCH_LIBRARY_IMPL(polarprune_C, CUDA, m)``."""
    body = _block(registration, "TORCH_LIBRARY_IMPL(polarprune_C, CUDA, m)")
    return dict(re.findall(r'm\.impl\(\s*"(\w+)"\s*,\s*&polarprune::(\w+)\s*\)', body))


def host_decls(header: str) -> dict[str, tuple[str, list[str]]]:
    """C++ function name -> (return type, parameter types) of the declarations in gate_ops.h."""
    text = " ".join(_strip_comments(header).split())
    out = {}
    for ret, name, params in re.findall(r"(at::Tensor|std::tuple<[^;()]*>)\s+(\w+)\(([^;]*?)\);", text):
        types = [" ".join(p.split()[:-1]) for p in params.split(",") if p.strip()]   # drop the parameter name
        out[name] = (ret.replace(" ", ""), types)
    return out


def cpp_codes(header: str, table: str) -> dict[str, int]:
    """string -> code of the ``NamedCode <table>[]`` of gate_codes.h, enumerators resolved."""
    text = _strip_comments(header)
    enumerators = {k: int(v) for k, v in re.findall(r"\b(k\w+)\s*=\s*(-?\d+)", text)}
    entries = re.search(rf"{table}\[\]\s*=\s*\{{(.*?)\}};", text, flags=re.S)
    assert entries, f"no table {table} in gate_codes.h"
    out = {}
    for name, code in re.findall(r'\{\s*"(\w+)"\s*,\s*(\w+)\s*\}', entries.group(1)):
        out[name] = int(code) if code.lstrip("-").isdigit() else enumerators[code]
    return out


def _signature(schema: torch.FunctionSchema):
    return ([(a.name, str(a.type)) for a in schema.arguments], [str(r.type) for r in schema.returns])


def _python_schemas() -> dict[str, torch.FunctionSchema]:
    return {name: common.schema_of(op) for name, op in functional.ALL_OPS.items()}


# --------------------------------------------------------------------------- the checks

def schema_problems(registration: str) -> list[str]:
    problems = []
    cpp, py = cpp_schemas(registration), _python_schemas()
    if set(cpp) != set(py):
        problems.append(f"op sets differ: only C++ {sorted(set(cpp) - set(py))}, only Python {sorted(set(py) - set(cpp))}")
    for name in sorted(set(cpp) & set(py)):
        (cargs, crets), (pargs, prets) = _signature(cpp[name]), _signature(py[name])
        if cargs != pargs:
            problems.append(f"{name}: arguments differ: C++ {cargs} vs Python {pargs}")
        if crets != prets:
            problems.append(f"{name}: returns differ: C++ {crets} vs Python {prets}")
    return problems


def impl_problems(registration: str, header: str) -> list[str]:
    problems = []
    impls, decls, schemas = cpp_impls(registration), host_decls(header), cpp_schemas(registration)
    if set(impls) != set(common.OPS):
        problems.append(f"m.impl ops {sorted(impls)} != common.OPS {sorted(common.OPS)}")
    for op, fn in sorted(impls.items()):
        if fn != f"{op}_cuda":
            problems.append(f"m.impl({op!r}) binds {fn}, expected {op}_cuda")
        if fn not in decls:
            problems.append(f"{fn} is not declared in gate_ops.h")
            continue
        if op not in schemas:
            continue
        ret, types = decls[fn]
        schema = schemas[op]
        want = [CPP_PARAM[str(a.type)] for a in schema.arguments]
        if types != want:
            problems.append(f"{fn}: parameter types {types} do not match the schema's {want}")
        n = len(schema.returns)
        want_ret = "at::Tensor" if n == 1 else "std::tuple<" + ",".join(["at::Tensor"] * n) + ">"
        if ret != want_ret:
            problems.append(f"{fn}: returns {ret}, the schema returns {n} tensors ({want_ret})")
    return problems


def code_problems(header: str) -> list[str]:
    problems = []
    for table, python in (("kSteNames", common.STE_CODES), ("kPolarNames", common.POLAR_CODES)):
        cpp = cpp_codes(header, table)
        if cpp != python:
            problems.append(f"{table} {cpp} != Python {python}")
    return problems


def triton_code_problems(source: str) -> list[str]:
    """The Triton copy of the code tables (kernels/_common.py, read as text: no triton needed) against Python."""
    import ast

    tables = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("STE_CODES", "POLAR_CODES"):
                tables[node.targets[0].id] = ast.literal_eval(node.value)
    problems = []
    for name, python in (("STE_CODES", common.STE_CODES), ("POLAR_CODES", common.POLAR_CODES)):
        if tables.get(name) != python:
            problems.append(f"kernels/_common.py {name} {tables.get(name)} != Python {python}")
    return problems


# --------------------------------------------------------------------------- tests

def test_every_cpp_schema_equals_the_python_schema():
    assert set(cpp_schemas(REGISTRATION)) == set(common.OPS)
    assert schema_problems(REGISTRATION) == []


def test_every_op_has_its_cuda_kernel_declared_with_the_schema_types():
    assert impl_problems(REGISTRATION, HOST_DECLS) == []


def test_cpp_codes_equal_the_python_table():
    assert code_problems(CODES) == []
    assert common.STE_MODES == tuple(common.STE_CODES) and common.POLAR_FORMS == tuple(common.POLAR_CODES)
    assert reference.STE_MODES is common.STE_MODES and reference.POLAR_FORMS is common.POLAR_FORMS


def test_triton_codes_equal_the_python_table():
    assert triton_code_problems(TRITON_COMMON) == []
    edited = TRITON_COMMON.replace('"sigmoid": 2}', '"sigmoid": 3}', 1)
    assert edited != TRITON_COMMON and triton_code_problems(edited)


def test_the_op_lists_derive_from_one():
    from polarprune_cuda.ops import backends

    assert backends.OPS is common.OPS
    assert tuple(functional.ALL_OPS) == common.OPS
    for name, op in functional.ALL_OPS.items():
        assert common.schema_of(op).name == f"{common.NAMESPACE}::{name}"


def test_every_op_is_in_the_namespace():
    for name in functional.ALL_OPS:
        assert hasattr(torch.ops.polarprune, name), name


@pytest.mark.parametrize("edit", [
    ("float tau) -> Tensor", "float temperature) -> Tensor"),          # an argument renamed
    ("str polar_form, float t)", "str polar_form, int t)"),             # an argument's type
    ("-> (Tensor, Tensor, Tensor, Tensor)", "-> (Tensor, Tensor, Tensor)"),   # a return dropped
    ('m.def("channel_gate(Tensor x, Tensor gate) -> Tensor");', ""),    # an op dropped
])
def test_a_one_sided_schema_edit_is_caught(edit):
    old, new = edit
    assert old in REGISTRATION
    assert schema_problems(REGISTRATION.replace(old, new, 1))


def test_a_one_sided_host_or_impl_edit_is_caught():
    assert impl_problems(REGISTRATION.replace('m.impl("gate_bank", &polarprune::gate_bank_cuda);', ""), HOST_DECLS)
    header = HOST_DECLS.replace("c10::string_view ste, double tau);", "int64_t ste, double tau);", 1)
    assert header != HOST_DECLS and impl_problems(REGISTRATION, header)


@pytest.mark.parametrize("edit", [
    ("kSteClipped = 1", "kSteClipped = 3"),
    ('{"bimodal", kPolarBimodal}', '{"bimodal", kPolarZhuang}'),
    ('{"sigmoid", kSteSigmoid}', '{"logistic", kSteSigmoid}'),
])
def test_a_one_sided_code_edit_is_caught(edit):
    old, new = edit
    assert old in CODES
    assert code_problems(CODES.replace(old, new))
