"""Auxiliary losses and statistics reported by modules deep inside a model.

ESPnet's encoder contract cannot return a loss (``ESPnetASRModel.encode`` discards the
third return value), and its layers call ``self.feed_forward(x)`` with no side channel.
So a module that produces an auxiliary loss (an MoE balance loss, a gate cost) records
it on itself during ``forward``; :class:`espnet_ext.models.asr_model.ESPnetExtASRModel`
collects every record after the forward pass and adds ``weight * loss`` to the loss it
returns, so ESPnet's trainer scales it for ``accum_grad`` and AMP like the rest.

Records live until collected or cleared. Our top-level encoders and decoders clear
their own subtree at the start of each forward, so a model class that never collects
(``model: espnet``) keeps at most one forward's worth, never a growing graph.
"""

import warnings
from typing import Dict, List, NamedTuple, Optional

import torch

__all__ = ["AuxRecorder", "AuxOutputs", "clear_aux", "collect_aux"]


class _Record(NamedTuple):
    kind: str  # "loss" or "stat"
    name: str
    value: torch.Tensor  # scalar
    weight: float  # the reporting module's default weight (losses only)


class AuxOutputs(NamedTuple):
    """Per-name means over all records of one forward pass.

    losses: ``{name: scalar tensor}`` (with gradient)
    weights: ``{name: default weight declared by the reporting modules}``
    stats: ``{name: scalar tensor}`` (detached, for logging only)
    """

    losses: Dict[str, torch.Tensor]
    weights: Dict[str, float]
    stats: Dict[str, torch.Tensor]


class AuxRecorder:
    """Mixin for ``torch.nn.Module`` s that report auxiliary losses or statistics."""

    _aux_records: List[_Record]

    def _aux_buffer(self) -> List[_Record]:
        # Created lazily so the mixin needs no __init__ cooperation.
        buf = self.__dict__.get("_aux_records")
        if buf is None:
            buf = []
            self.__dict__["_aux_records"] = buf
        return buf

    def record_aux_loss(self, name: str, value: torch.Tensor, weight: float) -> None:
        """Record a scalar loss; ``weight`` is used unless ``model_conf`` overrides it."""
        self._aux_buffer().append(_Record("loss", name, value, float(weight)))

    def record_aux_stat(self, name: str, value: torch.Tensor) -> None:
        """Record a scalar statistic for the training log (never back-propagated)."""
        self._aux_buffer().append(_Record("stat", name, value.detach(), 0.0))


def clear_aux(root: torch.nn.Module, owner: Optional[str] = None) -> None:
    """Drop every record in ``root``'s subtree (top-level modules call this first).

    With ``owner`` set, warn once if a non-zero-weighted loss of the previous forward
    was never collected: the model class ignores it (e.g. ``model: espnet``), so it is
    logged nowhere and trained on by nobody.
    """
    for m in root.modules():
        if not isinstance(m, AuxRecorder):
            continue
        buf = m._aux_buffer()
        if owner is not None and owner not in _warned:
            for r in buf:
                if r.kind == "loss" and r.weight != 0.0 and r.value.requires_grad:
                    _warned.add(owner)
                    warnings.warn(
                        f"aux loss {r.name!r} (weight {r.weight}) of {owner} is not "
                        f"being trained on: select 'model: espnet_ext' so that the "
                        f"model adds it to the loss",
                        stacklevel=3,
                    )
                    break
        buf.clear()


_warned: set = set()


def collect_aux(root: torch.nn.Module) -> AuxOutputs:
    """Pop every record in ``root``'s subtree and average them per name.

    Averaging (not summing) over layers keeps a loss weight independent of depth.

    Raises:
        ValueError: if modules declare different default weights for one loss name.
    """
    grouped: Dict[str, List[_Record]] = {}
    for m in root.modules():
        if isinstance(m, AuxRecorder):
            buf = m._aux_buffer()
            for r in buf:
                grouped.setdefault(r.name, []).append(r)
            buf.clear()
    losses, weights, stats = {}, {}, {}
    for name, records in grouped.items():
        kinds = {r.kind for r in records}
        if len(kinds) != 1:
            raise ValueError(f"aux name {name!r} is reported both as a loss and a stat")
        mean = torch.stack([r.value.float() for r in records]).mean()
        if "loss" in kinds:
            declared = {r.weight for r in records}
            if len(declared) != 1:
                raise ValueError(
                    f"modules declare different weights {sorted(declared)} for aux loss "
                    f"{name!r}; set model_conf.aux_loss_weights[{name!r}] explicitly"
                )
            losses[name] = mean
            weights[name] = declared.pop()
        else:
            stats[name] = mean
    return AuxOutputs(losses, weights, stats)
