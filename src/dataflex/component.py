"""What selectors, mixers and weighters have in common: typed params, a registry, resumable state.

A *component* turns scores into a decision and nothing else: a selector into training-set
indices, a mixer into domain proportions, a weighter into per-sample loss weights. Each one is a
class in one file, registered by name for its *kind* (the section of the components file it is
looked up in); a user's own class can be named by path instead (``my_file.py:MyWeighter`` or
``my_package.module:MyWeighter``). Components never import LLaMA-Factory.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .errors import ConfigError
from .params import Params

class Component:
    """Base of every component. Subclasses set ``name``, ``Params`` and ``summary``."""

    kind: ClassVar[str] = ""  # the components-file section (a mode's `section` in dataflex.modes)
    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    summary: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()  # signals it reads: "losses", "embeddings", "excess", "router"
    needs_eval: ClassVar[bool] = False  # requires `eval_dataset` in the training YAML
    supported_finetuning: ClassVar[tuple[str, ...] | None] = None  # None: any finetuning_type

    def __init__(self, params: Params):
        self.params = params

    @property
    def reference_model_path(self) -> str | None:
        """A reference model the component reads beside the training model (checked against its tokenizer)."""
        return None

    def check_config(self, cfg: dict[str, Any], spec: Any) -> None:
        """Checks of what the component declares it needs, on the raw training config (raise ConfigError).

        ``spec`` is its entry in the components file (``key``, ``singular``, ``name``), for the messages.
        """
        what = f"{spec.singular} '{spec.name}'"
        if self.needs_eval and not cfg.get("eval_dataset"):
            raise ConfigError(f"eval_dataset: required by {what} (component '{spec.key}'); "
                              "name a registered dataset of the target task")
        ft = cfg.get("finetuning_type", "lora")
        if self.supported_finetuning is not None and ft not in self.supported_finetuning:
            raise ConfigError(f"finetuning_type: '{ft}' is not supported by {what}; "
                              f"supported: {', '.join(self.supported_finetuning)}")

    def check_data(self, train_size: int, eval_size: int | None) -> None:
        """Checks that need the tokenized data's sizes (run once before training; raise ConfigError)."""

    # State that must survive a restart (saved in the HF checkpoint). JSON-serialisable.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


# kind -> name -> class; filled by @register as the component packages are imported
REGISTRY: dict[str, dict[str, type[Component]]] = {}


def register(cls: type[Component]) -> type[Component]:
    """Class decorator: make ``cls`` available as ``name:`` in its kind's section."""
    if not cls.name or not cls.kind:
        raise TypeError(f"{cls.__name__} needs a name and a kind")
    REGISTRY.setdefault(cls.kind, {})[cls.name] = cls
    return cls
