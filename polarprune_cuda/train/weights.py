"""``--init``: pretrained weights into the model the recipe builds.

:func:`read_state_dict` reads ``.pt``/``.pth`` (``torch.load`` with ``weights_only=True``: tensors and plain
containers, no code) and ``.safetensors`` (the ``safetensors`` package); a checkpoint that wraps its state_dict
under ``"model"`` or ``"state_dict"``, or whose names all start with ``module.`` (a DistributedDataParallel
save), is unwrapped. :func:`load_init` loads it: every missing, unexpected or misshapen name is reported by name;
the classifier (the last layer whose outputs are the classes) is re-initialised with ``reset_classifier`` or when
its shape differs (another number of classes: the fine-tuning case), and that is said in the run's report.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .._io import check_archive, load_failure

#: how many names an error lists before "and N more"
SHOWN = 10


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def read_state_dict(path) -> dict[str, Tensor]:
    """The state_dict in ``path`` (.pt, .pth, .safetensors), unwrapped (see the module's text)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"init: {str(path)!r} is not a file")
    try:
        if path.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ValueError(f"init: {str(path)!r} is a safetensors file, and the safetensors package is not "
                                 "installed: pip install safetensors") from None
            state = load_file(str(path), device="cpu")
        else:
            check_archive(path, f"init: {str(path)!r}")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"init: cannot read weights from {str(path)!r}: {load_failure(exc)}") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not state or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                            for k, v in state.items()):
        raise ValueError(f"init: {str(path)!r} must hold a state_dict (names to tensors), got "
                         f"{type(state).__name__}{' (empty)' if isinstance(state, dict) and not state else ''}")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def classifier_name(model: nn.Module, num_classes: int) -> str | None:
    """The name of the model's classifier: timm's ``get_classifier()``, else the last Linear or Conv2d module
    with ``num_classes`` outputs (None: none found)."""
    names = {m: n for n, m in model.named_modules()}
    get = getattr(model, "get_classifier", None)
    if callable(get):
        try:
            head = get()
        except Exception:   # noqa: BLE001 - a model's own method: any failure means "not known"
            head = None
        if isinstance(head, (nn.Linear, nn.Conv2d)) and head in names:
            return names[head]
    last = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == num_classes) or \
                (isinstance(m, nn.Conv2d) and m.out_channels == num_classes):
            last = name
    return last


def load_init(model: nn.Module, path, num_classes: int, reset_classifier: bool = False) -> dict:
    """Load ``path``'s weights into ``model`` (see the module's text); returns what happened, for the report:
    ``{"path", "loaded", "classifier_reset": [names], "reason"}``."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = classifier_name(model, num_classes)
    head_keys = [k for k in own if k.startswith(head + ".")] if head is not None else []
    reason = None
    if head_keys and reset_classifier:
        reason = "--reset-classifier"
    elif head_keys and any(k in state and state[k].shape != own[k].shape for k in head_keys):
        k = next(k for k in head_keys if k in state and state[k].shape != own[k].shape)
        reason = (f"the checkpoint's classifier has shape {tuple(state[k].shape)} for {k}, the model's "
                  f"{tuple(own[k].shape)} ({num_classes} classes)")
    if reason is not None:
        state = {k: v for k, v in state.items() if k not in head_keys}
    shapes = [f"{k} {tuple(v.shape)} (the model's {tuple(own[k].shape)})" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    if shapes:
        raise ValueError(f"init: {str(path)!r} does not fit the model: misshapen {_names(shapes)}")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"init: {str(path)!r}: NaN or inf in {_names(bad)}")
    missing = [k for k in own if k not in state and not (reason is not None and k in head_keys)]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"missing {len(missing)}: {_names(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)}: {_names(unexpected)}"] if unexpected else [])
        raise ValueError(f"init: {str(path)!r} does not fit the model ({'; '.join(parts)})")
    if reason is not None:   # a fresh classifier: the model's own initialisation, drawn from the run's seed
        module = model.get_submodule(head)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    model.load_state_dict(state, strict=False)
    return {"path": str(path), "loaded": len(state), "classifier_reset": head_keys if reason else [],
            "reason": reason}
