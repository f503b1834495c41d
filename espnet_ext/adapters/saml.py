"""SAML as an adapter on any ESPnet model: attach, freeze, merge, save and load.

:func:`attach_saml` finds every attention module of a model (a module with a query and
a value projection child: ESPnet's ``linear_q``/``linear_v``, Whisper's
``query``/``value``), replaces its target projections by
:class:`~espnet_ext.layers.lora_moe.MoLoRALinear` (same state-dict keys for the base
weight, so ESPnet's ``--init_param`` loads a plain checkpoint into the adapted model),
and gives each *attention type* one shared :class:`SAMLRouter`, stored once in
``model.saml_routers``. The type of an attention module is ``<top>__<name>``: the first
component of its path and its own attribute name (``encoder__self_attn``,
``decoder__self_attn``, ``decoder__src_attn``; Whisper: ``encoder__attn``,
``decoder__attn``, ``decoder__cross_attn``). A forward pre-hook on each attention module
runs the shared router on *that layer's own input* and hands the probabilities (B, E) to
its projections for the call:

- self-attention: the router reads the key input (= the query input in training; in
  ESPnet's cached decoding the key input is the whole prefix, so decoding routes as
  training did), with the padding mask of the attention mask's last row;
- cross-attention (``cross_attention_names``): the query stream and the memory (with
  the memory mask), pooled separately and concatenated (SAML's cross router). In
  cached decoding the query stream is the newest position only (as SAML's Whisper
  decoding with its kv-cache).

``quantize`` (``none``/``nf4``/``int8``) stores the frozen base of the adapted
projections and, with ``quantize_all`` (default), every other weight of the kinds in
``quantize_modules`` (default: linear layers, convolutions and embeddings: the whole
base but norms, biases and weights the block size does not divide) in that format;
routers and experts stay fp32.
"""

import copy
import hashlib
import inspect
from typing import Dict, List, Optional, Sequence

import torch

from espnet_ext.layers.lora_moe import MIXINGS, MoLoRALinear, SAMLRouter
from espnet_ext.layers.quantize import FORMATS, KINDS, FrozenLinear
from espnet_ext.layers.quantize import quantize_modules as store_quantized

__all__ = [
    "TARGET_ALIASES",
    "attach_saml",
    "create_saml_adapter",
    "saml_layers",
    "adapter_state_dict",
    "trainable_counts",
    "base_fingerprint",
    "base_format",
    "save_adapter",
    "load_adapter",
    "set_fixed_routes",
    "merge_saml",
    "unmerge_saml",
    "ADAPTER_FILE_FORMAT",
    "install_into_espnet",
]

# Abstract projection names -> the attribute names used by ESPnet and by Whisper.
TARGET_ALIASES = {
    "q": ("linear_q", "query"),
    "k": ("linear_k", "key"),
    "v": ("linear_v", "value"),
    "out": ("linear_out", "out"),
}
ROUTERS_ATTR = "saml_routers"
ADAPTER_FILE_FORMAT = "espnet_ext.saml_adapter/1"
_ADAPTER_MARKERS = (".lora_a", ".lora_b", ROUTERS_ATTR + ".")


def _attention_modules(model: torch.nn.Module):
    """(path, module) of every module holding both a query and a value projection."""
    for name, mod in model.named_modules():
        kids = dict(mod.named_children())
        has_q = any(n in kids for n in TARGET_ALIASES["q"])
        has_v = any(n in kids for n in TARGET_ALIASES["v"])
        if has_q and has_v and name:
            yield name, mod


def _type_key(path: str) -> str:
    parts = path.split(".")
    return parts[-1] if len(parts) == 1 else f"{parts[0]}__{parts[-1]}"


def _feature_size(mod: torch.nn.Module, which: str) -> int:
    """Input size of the module's query (``q``) or key (``k``) projection."""
    for alias in TARGET_ALIASES[which]:
        lin = getattr(mod, alias, None)
        if lin is not None and hasattr(lin, "in_features"):
            return lin.in_features
    raise ValueError(f"{type(mod).__name__} has no {which} projection")


class _RouteHook:
    """Runs the type's router on the attention module's input, once per call."""

    def __init__(self, router_owner, key: str, cross: bool, linears):
        # The routers live in the root model; keep a weak path (owner + key) rather
        # than a second reference, so state dicts count each router once.
        self.owner = [router_owner]
        self.key = key
        self.cross = cross
        self.linears = linears
        self.sig = None

    def router(self) -> SAMLRouter:
        return getattr(self.owner[0], ROUTERS_ATTR)[self.key]

    def pre(self, module, args, kwargs):
        if self.sig is None:
            self.sig = inspect.signature(module.forward)
        bound = self.sig.bind(*args, **kwargs).arguments
        if "query" in bound:  # ESPnet: (query, key, value, [pos_emb], mask, ...)
            q, k, mask = bound["query"], bound["key"], bound.get("mask")
            kmask = _key_mask(mask, k)
        else:  # Whisper: (x, xa=None, mask=None, kv_cache=None); mask is causal
            q, k = bound["x"], bound.get("xa")
            k = q if k is None else k
            kmask = None
        router = self.router()
        if self.cross:
            probs = router(q, None, k, kmask)
        else:
            probs = router(k, kmask)
        for lin in self.linears:
            lin.route = probs

    def post(self, module, args, kwargs, output):
        for lin in self.linears:
            lin.route = None


def _key_mask(mask, key) -> Optional[torch.Tensor]:
    """(B, T) bool padding mask of the key frames from ESPnet's (B|1, T1, T) mask."""
    if mask is None or mask.dim() != 3 or mask.shape[-1] != key.shape[1]:
        return None
    m = mask[:, -1, :]
    m = m if m.dtype == torch.bool else m != 0
    return m.expand(key.shape[0], -1)


def attach_saml(
    model: torch.nn.Module,
    num_experts: int = 10,
    rank: int = 4,
    alpha: float = 64.0,
    dropout_rate: float = 0.2,
    temperature: float = 1.0,
    target_modules: Sequence[str] = ("q", "k", "v", "out"),
    mixing: str = "parameter",
    router_kernel_size: int = 3,
    cross_attention_names: Sequence[str] = ("src_attn", "cross_attn"),
    attention_types: Optional[Sequence[str]] = None,
    quantize: str = "none",
    quantize_block_size: int = 64,
    quantize_scaler_block_size: int = 256,
    quantize_all: bool = True,
    quantize_modules: Sequence[str] = KINDS,
    freeze_base: bool = True,
) -> Dict[str, List[str]]:
    """Add SAML experts and routers to ``model`` in place.

    Args:
        target_modules: projections to adapt, any of ``q``, ``k``, ``v``, ``out``
            (or the literal names ``linear_q``, ``query``, ...).
        attention_types: only these type keys (e.g. ``["encoder__self_attn"]``);
            None = every attention module found.
        freeze_base: set ``requires_grad=False`` on every parameter that is not an
            expert or router (the adapter use); False keeps the model's other
            parameters and the adapted projections' fp32 base trainable (training
            from scratch).
        Others: see the module docstring and :class:`MoLoRALinear`.

    Returns:
        ``{type_key: [attention module paths]}``.

    Raises:
        ValueError: bad option values, or no attention module / projection found.
    """
    if quantize not in FORMATS:
        raise ValueError(f"quantize must be one of {FORMATS}, got {quantize!r}")
    if mixing not in MIXINGS:
        raise ValueError(f"mixing must be one of {MIXINGS}, got {mixing!r}")
    if quantize != "none" and not freeze_base:
        raise ValueError(
            f"quantize: {quantize} needs freeze_base: true (a quantised base "
            "cannot train)"
        )
    names = set()
    for t in target_modules:
        if t in TARGET_ALIASES:
            names.update(TARGET_ALIASES[t])
        elif any(t in v for v in TARGET_ALIASES.values()):
            names.add(t)
        else:
            raise ValueError(
                f"target_modules: unknown projection {t!r}; use q, k, v, out"
            )
    if hasattr(model, ROUTERS_ATTR):
        raise ValueError("attach_saml: this model already has SAML routers")
    found = list(_attention_modules(model))
    if attention_types is not None:
        unknown = set(attention_types) - {_type_key(p) for p, _ in found}
        if unknown:
            raise ValueError(
                f"attention_types: {sorted(unknown)} not found; the model has "
                f"{sorted({_type_key(p) for p, _ in found})}"
            )
        found = [(p, m) for p, m in found if _type_key(p) in attention_types]
    if not found:
        raise ValueError("attach_saml: no attention module (query+value) found")

    routers = torch.nn.ModuleDict()
    groups: Dict[str, List[str]] = {}
    device = next(model.parameters()).device
    for path, mod in found:
        key = _type_key(path)
        cross = path.split(".")[-1] in cross_attention_names
        linears = []
        for cname, child in list(mod.named_children()):
            if cname not in names:
                continue
            if isinstance(child, MoLoRALinear) or not isinstance(
                child, torch.nn.Linear
            ):
                raise ValueError(f"{path}.{cname} is not a plain linear projection")
            new = MoLoRALinear.from_linear(
                child,
                num_experts,
                rank,
                alpha,
                dropout_rate,
                mixing,
                quantize,
                quantize_block_size,
                quantize_scaler_block_size,
            )
            setattr(mod, cname, new)
            linears.append(new)
        if not linears:
            raise ValueError(
                f"target_modules {list(target_modules)} matched no projection of "
                f"{path}"
            )
        if key not in routers:
            d_q = _feature_size(mod, "q")
            d_k = _feature_size(mod, "k") if cross else None
            routers[key] = SAMLRouter(
                d_q, num_experts, temperature, router_kernel_size, d_k
            ).to(device)
        hook = _RouteHook(model, key, cross, linears)
        mod.register_forward_pre_hook(hook.pre, with_kwargs=True)
        mod.register_forward_hook(hook.post, with_kwargs=True)
        groups.setdefault(key, []).append(path)
    model.add_module(ROUTERS_ATTR, routers)
    if quantize != "none" and quantize_all:
        store_quantized(
            model,
            quantize,
            quantize_block_size,
            quantize_scaler_block_size,
            skip=(ROUTERS_ATTR,),
            kinds=quantize_modules,
        )
    if freeze_base:
        for n, p in model.named_parameters():
            p.requires_grad = _is_adapter_param(n)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                # A frozen base keeps its BatchNorm statistics (the conformer's
                # convolution module) also in training mode: adapting must not
                # change the base (its fingerprint, other speakers' outputs).
                m.register_forward_pre_hook(_frozen_batchnorm)
    else:
        for m in saml_layers(model).values():
            if m.fmt == "none":
                m.weight.requires_grad = True
            if m.bias is not None:
                m.bias.requires_grad = True
    model._saml_conf = dict(
        num_experts=num_experts,
        rank=rank,
        alpha=alpha,
        dropout_rate=dropout_rate,
        temperature=temperature,
        target_modules=list(target_modules),
        mixing=mixing,
        router_kernel_size=router_kernel_size,
        cross_attention_names=list(cross_attention_names),
        attention_types=None if attention_types is None else list(attention_types),
        quantize=quantize,
        quantize_block_size=quantize_block_size,
        quantize_scaler_block_size=quantize_scaler_block_size,
        quantize_all=quantize_all,
        quantize_modules=list(quantize_modules),
    )
    return groups


def _frozen_batchnorm(module, args) -> None:
    module.training = False


def _is_adapter_param(name: str) -> bool:
    return name.startswith(ROUTERS_ATTR + ".") or any(
        m in name for m in _ADAPTER_MARKERS
    )


def saml_layers(model: torch.nn.Module) -> Dict[str, MoLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MoLoRALinear)}


def trainable_counts(model: torch.nn.Module) -> Dict[str, int]:
    """Parameters that train and that do not, and the quantised base's values."""
    tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fr = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    q = sum(
        m.in_features * m.out_features
        for m in model.modules()
        if isinstance(m, FrozenLinear) and m.fmt != "none"
    )
    return {"trainable": tr, "frozen": fr, "quantized_weights": q}


def base_format(model: torch.nn.Module) -> str:
    """``"nf4"``/``"int8"`` if the adapted projections' base is quantised, else none."""
    fmts = {m.fmt for m in saml_layers(model).values()}
    return fmts.pop() if len(fmts) == 1 else ("mixed" if fmts else "none")


def adapter_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """Only the experts and routers (what a per-speaker file holds)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if _is_adapter_param(k)
    }


def base_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of every non-adapter tensor of the state dict (names, shapes, bytes).

    A quantised base hashes its stored codes and scales, so an fp32 model and its
    NF4 copy differ.
    """
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if _is_adapter_param(k) or not torch.is_tensor(v):
            continue
        t = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}|{tuple(v.shape)}|{v.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_adapter(
    model: torch.nn.Module, path: str, speaker: Optional[str] = None, extra=None
) -> None:
    """Write the experts + routers of ``model`` with the base model's fingerprint."""
    torch.save(
        {
            "format": ADAPTER_FILE_FORMAT,
            "speaker": speaker,
            "base_fingerprint": base_fingerprint(model),
            "base_quantize": base_format(model),
            "saml_conf": dict(getattr(model, "_saml_conf", {})),
            "state_dict": adapter_state_dict(model),
            "extra": dict(extra or {}),
        },
        path,
    )


def load_adapter(model: torch.nn.Module, path: str, check_base: bool = True) -> dict:
    """Load a per-speaker adapter file onto a SAML model; refuse a wrong base.

    Raises:
        ValueError: not an adapter file; saved on a quantised base and loaded on a
            full-precision one (or the reverse, or another format); saved for
            another base model (fingerprint); expert/router shapes differ.
    """
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FILE_FORMAT:
        raise ValueError(f"{path} is not a SAML adapter file ({ADAPTER_FILE_FORMAT})")
    fmt = base_format(model)
    if blob["base_quantize"] != fmt:

        def word(f):
            return "full precision (fp32)" if f == "none" else f"{f}-quantised"

        raise ValueError(
            f"{path} was adapted on a {word(blob['base_quantize'])} base, but this "
            f"model's base is {word(fmt)}; load the base with "
            f"quantize: {blob['base_quantize']}"
        )
    if check_base:
        fp = base_fingerprint(model)
        if fp != blob["base_fingerprint"]:
            raise ValueError(
                f"{path} was made for another base model (fingerprint "
                f"{blob['base_fingerprint'][:12]}, this model {fp[:12]}): an adapter "
                f"only fits the exact base it was trained on"
            )
    own = adapter_state_dict(model)
    sd = blob["state_dict"]
    if set(sd) != set(own):
        raise ValueError(
            f"{path}: adapter keys differ from this model's (missing "
            f"{sorted(set(own) - set(sd))[:3]}, unexpected "
            f"{sorted(set(sd) - set(own))[:3]}); attach SAML with the same options"
        )
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise ValueError(
                f"{path}: {k} has shape {tuple(v.shape)}, the model "
                f"{tuple(own[k].shape)} (num_experts/rank differ)"
            )
    model.load_state_dict(sd, strict=False)
    return blob


def routers(model: torch.nn.Module) -> torch.nn.ModuleDict:
    r = getattr(model, ROUTERS_ATTR, None)
    if r is None:
        raise ValueError("this model has no SAML adapter (attach_saml first)")
    return r


def set_fixed_routes(model, routes: Optional[Dict[str, torch.Tensor]]) -> None:
    """Make each type's router return a fixed (E,) route; None restores routing."""
    for key, r in routers(model).items():
        r.fixed_route = None if routes is None else routes[key].detach()


@torch.no_grad()
def merge_saml(model, routes: Dict[str, torch.Tensor]) -> None:
    """Fold the experts of every adapted projection for fixed per-type routes (E,)."""
    for path, mod in _attention_modules(model):
        key = _type_key(path)
        if key not in routes:
            continue
        for child in mod.children():
            if isinstance(child, MoLoRALinear):
                child.merge(routes[key])


def unmerge_saml(model) -> None:
    for m in saml_layers(model).values():
        m.unmerge()


@torch.no_grad()
def mean_routes(model, run) -> Dict[str, torch.Tensor]:
    """Average router output per type over the forwards ``run()`` makes.

    A speaker's fixed route for :func:`merge_saml`: the utterance-level routes of
    their adaptation utterances, averaged (``run`` e.g. calls the model's loss on
    them).
    """
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}
    handles = []
    for key, r in routers(model).items():

        def hook(mod, args, out, key=key):
            sums[key] = sums.get(key, 0) + out.detach().sum(0).float()
            counts[key] = counts.get(key, 0) + out.shape[0]

        handles.append(r.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return {k: sums[k] / counts[k] for k in sums}


def create_saml_adapter(
    model: torch.nn.Module,
    num_experts: int = 10,
    rank: int = 4,
    alpha: float = 64.0,
    dropout_rate: float = 0.2,
    temperature: float = 1.0,
    target_modules: List[str] = ["q", "k", "v", "out"],
    mixing: str = "parameter",
    router_kernel_size: int = 3,
    cross_attention_names: List[str] = ["src_attn", "cross_attn"],
    attention_types: Optional[List[str]] = None,
    quantize: str = "none",
    quantize_block_size: int = 64,
    quantize_scaler_block_size: int = 256,
    quantize_all: bool = True,
    quantize_modules: List[str] = list(KINDS),
    init_experts: Optional[List[str]] = None,
):
    """ESPnet's ``create_adapter_fn_table["saml"]``: ``adapter: saml`` in a YAML.

    Every ``adapter_conf`` key is an argument here; the base is frozen (adapter
    use). ``init_experts``: E per-speaker adapter files made with ``num_experts: 1``
    (one LoRA per training speaker, e.g. by ``espnet_ext.bin.adapt_speaker``);
    expert e of every projection starts from file e's LoRA (the paper's
    initialisation).
    """
    attach_saml(
        model,
        num_experts=num_experts,
        rank=rank,
        alpha=alpha,
        dropout_rate=dropout_rate,
        temperature=temperature,
        target_modules=target_modules,
        mixing=mixing,
        router_kernel_size=router_kernel_size,
        cross_attention_names=cross_attention_names,
        attention_types=attention_types,
        quantize=quantize,
        quantize_block_size=quantize_block_size,
        quantize_scaler_block_size=quantize_scaler_block_size,
        quantize_all=quantize_all,
        quantize_modules=quantize_modules,
        freeze_base=True,
    )
    if init_experts:
        init_experts_from_loras(model, init_experts)


@torch.no_grad()
def init_experts_from_loras(model: torch.nn.Module, files: Sequence[str]) -> None:
    """Expert e of every adapted projection <- the single LoRA in ``files[e]``.

    Each file is a SAML adapter file with one expert (``num_experts: 1``); its base
    fingerprint is not checked (the LoRAs may have been trained on the fp32 base
    while the mixture sits on its quantised copy), its shapes are.
    """
    layers = saml_layers(model)
    e_total = next(iter(layers.values())).num_experts
    if len(files) != e_total:
        raise ValueError(
            f"init_experts: {len(files)} files for num_experts={e_total} experts"
        )
    for e, f in enumerate(files):
        blob = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FILE_FORMAT:
            raise ValueError(f"init_experts: {f} is not a SAML adapter file")
        sd = blob["state_dict"]
        for name, m in layers.items():
            a, b = sd.get(name + ".lora_a"), sd.get(name + ".lora_b")
            if a is None or b is None:
                raise ValueError(f"init_experts: {f} has no LoRA for {name}")
            if a.shape[0] != 1 or a.shape[1:] != m.lora_a.shape[1:]:
                raise ValueError(
                    f"init_experts: {f} {name}.lora_a is {tuple(a.shape)}, needs "
                    f"(1, {m.rank}, {m.in_features}) (one expert, same rank)"
                )
            m.lora_a[e].copy_(a[0])
            m.lora_b[e].copy_(b[0])


def merged_plain_model(model: torch.nn.Module, routes: Dict[str, torch.Tensor]):
    """A deep copy of ``model`` in which every adapted projection is a plain
    ``nn.Linear`` for the fixed routes: the speaker's model without any SAML code.

    Its state dict has exactly the base model's keys when the base is fp32 (it loads
    into the un-adapted model class); routers and hooks are gone.
    """
    plain = copy.deepcopy(model)
    for path, mod in list(_attention_modules(plain)):
        _remove_route_hooks(mod)
        key = _type_key(path)
        for cname, child in list(mod.named_children()):
            if isinstance(child, MoLoRALinear):
                setattr(mod, cname, child.to_linear(routes[key]))
    delattr(plain, ROUTERS_ATTR)
    if hasattr(plain, "_saml_conf"):
        del plain._saml_conf
    return plain


def _remove_route_hooks(mod: torch.nn.Module) -> None:
    for hooks, kw in (
        (mod._forward_pre_hooks, mod._forward_pre_hooks_with_kwargs),
        (mod._forward_hooks, mod._forward_hooks_with_kwargs),
    ):
        for hid, fn in list(hooks.items()):
            if isinstance(getattr(fn, "__self__", None), _RouteHook):
                del hooks[hid]
                kw.pop(hid, None)


# --- ESPnet integration --------------------------------------------------------
def install_into_espnet(task_module=None) -> None:
    """Make ``adapter: saml`` a valid ESPnet choice (idempotent).

    ESPnet 202511 hard-codes ``--adapter`` ``choices=["lora", "houlsby"]`` in
    ``AbsTask.get_parser`` and keeps the builders in
    ``espnet2.layers.create_adapter.create_adapter_fn_table``. The table gets our
    builder; ``get_parser`` (rebuilt on every call) is wrapped so the ``--adapter``
    action also accepts ``saml``. Called by the registry when a task module is
    imported (``espnet_ext/registry.py``, ``EXTENSIONS``).
    """
    from espnet2.layers import create_adapter as ca
    from espnet2.tasks.abs_task import AbsTask

    ca.create_adapter_fn_table.setdefault("saml", create_saml_adapter)
    original = AbsTask.__dict__["get_parser"]
    if getattr(original.__func__, "_espnet_ext_saml", False):
        return
    inner = original.__func__

    def get_parser(cls):
        parser = inner(cls)
        for action in parser._actions:
            if action.dest == "adapter" and action.choices is not None:
                if "saml" not in action.choices:
                    action.choices = list(action.choices) + ["saml"]
        return parser

    get_parser._espnet_ext_saml = True
    get_parser.__doc__ = inner.__doc__
    AbsTask.get_parser = classmethod(get_parser)
