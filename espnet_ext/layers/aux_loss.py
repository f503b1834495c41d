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

Two ways a module's forward runs outside the plain one-forward-one-record pattern:

- ``torch.nn.DataParallel`` replicates modules by copying their ``__dict__``
  shallowly, so replicas would share one record list and clear and pop each other's
  records from their threads. :class:`AuxRecorder` gives every replica its own list.
- Gradient checkpointing (ESPnet's ``gradient_checkpoint_layers``, non-reentrant
  ``torch.utils.checkpoint``) re-runs a layer's forward inside the backward pass.
  That recomputation must run the same operations (it re-creates the tensors the
  first forward's aux-loss graph saved), but its records would come after collection
  and hold their graph until the next forward: records made while autograd is
  running a backward pass are dropped.
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


def _in_backward_pass() -> bool:
    """True while autograd's engine runs a backward pass in this thread.

    ``torch._C._current_graph_task_id`` is private (``torch.utils.checkpoint`` uses
    it for the same purpose); without it, recomputed records are simply kept until
    the next forward clears them, as before.
    """
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task_id is not None and graph_task_id() != -1


class AuxRecorder:
    """Mixin for ``torch.nn.Module`` s that report auxiliary losses or statistics.

    List it before ``torch.nn.Module`` in the bases (``class M(AuxRecorder,
    torch.nn.Module)``) so that its DataParallel replication hook takes effect.
    """

    _aux_records: List[_Record]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if torch.nn.Module in mro and mro.index(torch.nn.Module) < mro.index(
            AuxRecorder
        ):
            raise TypeError(
                f"{cls.__qualname__}: list AuxRecorder before torch.nn.Module in its "
                f"bases, or DataParallel replicas would share one record list"
            )

    def _replicate_for_data_parallel(self):
        # nn.Module's version copies __dict__ shallowly: give the replica its own
        # record list so that replicas running in parallel threads stay apart.
        replica = super()._replicate_for_data_parallel()
        replica.__dict__["_aux_records"] = []
        return replica

    def _aux_buffer(self) -> List[_Record]:
        # Created lazily so the mixin needs no __init__ cooperation.
        buf = self.__dict__.get("_aux_records")
        if buf is None:
            buf = []
            self.__dict__["_aux_records"] = buf
        return buf

    def record_aux_loss(self, name: str, value: torch.Tensor, weight: float) -> None:
        """Record a scalar loss; ``weight`` is used unless ``model_conf`` overrides it.

        Ignored during a backward pass (gradient-checkpoint recomputation).
        """
        if not _in_backward_pass():
            self._aux_buffer().append(_Record("loss", name, value, float(weight)))

    def record_aux_stat(self, name: str, value: torch.Tensor) -> None:
        """Record a scalar statistic for the training log (never back-propagated).

        Ignored during a backward pass (gradient-checkpoint recomputation).
        """
        if not _in_backward_pass():
            self._aux_buffer().append(_Record("stat", name, value.detach(), 0.0))


def clear_aux(root: torch.nn.Module, owner: Optional[str] = None) -> None:
    """Drop every record in ``root``'s subtree (top-level modules call this first).

    With ``owner`` set, warn if a non-zero-weighted loss of the previous forward was
    never collected: the model class ignores it (e.g. ``model: espnet``), so it is
    logged nowhere and trained on by nobody. Python's warning filters show each such
    message once per process (no state of ours to reset).
    """
    check = owner is not None
    for m in root.modules():
        if not isinstance(m, AuxRecorder):
            continue
        buf = m._aux_buffer()
        for r in buf if check else ():
            if r.kind == "loss" and r.weight != 0.0 and r.value.requires_grad:
                warnings.warn(
                    f"aux loss {r.name!r} (weight {r.weight}) of {owner} is not "
                    f"being trained on: select 'model: espnet_ext' so that the "
                    f"model adds it to the loss",
                    stacklevel=3,
                )
                check = False  # one warning per call is enough
                break
        buf.clear()


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
                    f"modules declare different weights {sorted(declared)} for aux "
                    f"loss {name!r}; set model_conf.aux_loss_weights[{name!r}] "
                    f"explicitly"
                )
            losses[name] = mean
            weights[name] = declared.pop()
        else:
            stats[name] = mean
    return AuxOutputs(losses, weights, stats)
