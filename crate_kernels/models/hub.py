"""Hugging Face Hub support for the models: ``save_pretrained(dir)``, ``from_pretrained(dir_or_repo_id)`` and
``push_to_hub(repo_id)`` through huggingface_hub's ``PyTorchModelHubMixin`` (the optional extra ``hub``).

A saved folder holds config.json (the constructor's arguments, without the runtime-only ``backend``, plus
``architecture``: the class name), model.safetensors (checksummed, as ``crate_kernels.checkpoint`` writes) and
README.md (a model card: architecture, parameter count, training command and data, the paper's citation).
Without huggingface_hub the package still imports; the three methods then raise an ImportError naming the extra.
"""
from __future__ import annotations

import json
import os
import re

from .. import checkpoint
from ..errors import TrainError

try:
    from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
except ImportError:  # the core works without the extra
    PyTorchModelHubMixin = hf_hub_download = None

__all__ = ["HubMixin", "CITATION", "PAPER_URL", "hub_available", "is_repo_id", "download"]

INSTALL = "pip install 'crate_kernels[hub]'"
PAPER_URL = "https://arxiv.org/abs/2404.02446"
CITATION = """@inproceedings{pai2024masked,
  title     = {Masked Completion via Structured Diffusion with White-Box Transformers},
  author    = {Pai, Druv and Wu, Ziyang and Buchanan, Sam and Yu, Yaodong and Ma, Yi},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2024},
  url       = {https://arxiv.org/abs/2404.02446}
}"""
RUNTIME_ONLY = ("backend",)  # constructor arguments that choose how to run, not what the weights are
WEIGHTS, CONFIG = "model.safetensors", "config.json"

CARD = """---
{{ card_data }}
---

# {{ architecture }}

{{ description }}

- Parameters: {{ parameters }}
- Configuration (config.json): {{ config }}
- Training command: {{ command | default("not recorded", true) }}
- Training data: {{ data | default("not recorded", true) }}

Load it with the `crate_kernels` package (`pip install 'crate_kernels[hub]'`):

```python
from crate_kernels import {{ architecture }}
model = {{ architecture }}.from_pretrained("{{ repo_id | default("THIS_FOLDER_OR_REPO_ID", true) }}")
```

The probe, fine-tuning and analysis commands take this folder or its repo id wherever they take a checkpoint.

## Citation

Masked Completion via Structured Diffusion with White-Box Transformers (Pai, Wu, Buchanan, Yu, Ma; ICLR 2024),
{{ paper_url }}:

```bibtex
{{ citation }}
```
"""


def hub_available() -> bool:
    return PyTorchModelHubMixin is not None


def _missing(what: str):
    raise ImportError(f"{what} needs huggingface_hub, the optional extra 'hub': {INSTALL}")


def is_repo_id(source: str) -> bool:
    """Whether ``source`` reads as a Hub repo id (``owner/name``, not a checkpoint file's name) and is no local
    path."""
    return (not os.path.exists(source) and re.fullmatch(r"[\w][\w.-]*/[\w][\w.-]*", source) is not None
            and not source.endswith((".pth", ".pt", ".safetensors", ".yaml")))


def download(repo_id: str, revision: str | None = None, **kwargs) -> str:
    """The local folder (Hub cache snapshot) holding ``repo_id``'s config.json and model.safetensors; offline
    (``HF_HUB_OFFLINE=1``) it is read from the cache. Errors are one line naming the repo."""
    if not hub_available():
        raise TrainError(f"checkpoint {repo_id} does not exist as a local file or folder (read as a Hugging Face "
                         f"Hub repo id it needs huggingface_hub, the optional extra 'hub': {INSTALL})")
    try:
        hf_hub_download(repo_id, CONFIG, revision=revision, **kwargs)
        return os.path.dirname(hf_hub_download(repo_id, WEIGHTS, revision=revision, **kwargs))
    except Exception as e:  # huggingface_hub raises many kinds (offline, not found, gated, HTTP)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__
        raise TrainError(f"checkpoint {repo_id} does not exist as a local file or folder, and cannot be read as a "
                         f"Hugging Face Hub repo id ({reason})") from None


def read_config(folder: str) -> dict:
    """config.json of a saved folder."""
    with open(os.path.join(folder, CONFIG), encoding="utf-8") as f:
        return json.load(f)


if hub_available():
    class HubMixin(PyTorchModelHubMixin, library_name="crate_kernels", paper_url=PAPER_URL, model_card_template=CARD,
                   tags=["crate", "white-box", "masked-autoencoder", "image-feature-extraction"]):
        """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (see the module docstring)."""

        def hub_config(self) -> dict:
            """config.json: the constructor's arguments (less the runtime-only ``backend``) and ``architecture``."""
            saved = {k: v for k, v in (self._hub_mixin_config or {}).items() if k not in RUNTIME_ONLY}
            return {**saved, "architecture": type(self).__name__}

        def save_pretrained(self, save_directory, *, config: dict | None = None, **kwargs):
            """Write config.json (``hub_config()`` updated with ``config``: e.g. the registry name ``model``),
            model.safetensors and README.md (``model_card_kwargs``: ``command``, ``data``, ``repo_id``) to
            ``save_directory``; ``push_to_hub=True, repo_id=...`` uploads it too."""
            return super().save_pretrained(save_directory, config={**self.hub_config(), **(config or {})}, **kwargs)

        def push_to_hub(self, repo_id: str, *, model_card_kwargs: dict | None = None, **kwargs) -> str:
            """Save to a temporary folder and upload it as ``repo_id`` (the card's example names the repo)."""
            card = {"repo_id": repo_id, **(model_card_kwargs or {})}
            return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

        def _save_pretrained(self, save_directory) -> None:
            meta = {"architecture": type(self).__name__}
            checkpoint.save_safetensors(self.state_dict(), os.path.join(save_directory, WEIGHTS), meta)

        def generate_model_card(self, *args, **kwargs):
            total = sum(p.numel() for p in self.parameters())
            config = self.hub_config()
            doc = (type(self).__doc__ or "").strip().splitlines()
            fields = dict(architecture=type(self).__name__, description=doc[0] if doc else "",
                          parameters=f"{total:,}", citation=CITATION,
                          config=", ".join(f"{k}={v}" for k, v in sorted(config.items()) if k != "architecture"))
            return super().generate_model_card(*args, **{**fields, **kwargs})

        @classmethod
        def _from_pretrained(cls, *, model_id: str, revision, cache_dir, force_download, local_files_only, token,
                             config: dict | None = None, map_location: str = "cpu", strict: bool = True,
                             **model_kwargs):
            """Build from config.json's arguments (``model_kwargs`` override them) and load the weights, every
            tensor checked (``strict``)."""
            saved = (config or {}).get("architecture")
            if saved is not None and saved != cls.__name__:
                raise TrainError(f"{model_id} holds a {saved}, not a {cls.__name__}: load it with "
                                 f"{saved}.from_pretrained")
            folder = model_id if os.path.isdir(model_id) else download(
                model_id, revision, cache_dir=cache_dir, force_download=force_download, token=token,
                local_files_only=local_files_only)
            model = cls(**model_kwargs)
            state = checkpoint.load(os.path.join(folder, WEIGHTS))["model"]
            model.load_state_dict(state, strict=strict)
            return model.to(map_location).eval()
else:
    class HubMixin:
        """Stand-in without huggingface_hub: the Hub methods name the missing extra."""

        def save_pretrained(self, *args, **kwargs):
            _missing("save_pretrained")

        def push_to_hub(self, *args, **kwargs):
            _missing("push_to_hub")

        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            _missing("from_pretrained")
