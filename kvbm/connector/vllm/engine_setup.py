"""What both sides of the vLLM connector read from vLLM's configuration
once, at construction: kvbm's engine settings, the KV cache's geometry,
the model's identity and the node's socket. Nothing here changes later."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvbm.config import KvbmConfig, engine_config
from kvbm.connector.attention_window import AttentionWindow
from kvbm.connector.identity import model_identity
from kvbm.connector.private_node import ensure_private_node
from kvbm.errors import KvbmError
from kvbm.layout import PACKED_MODES, VLLM_CPU_LAYOUT, ModelGeometry
from kvbm.logs import attach_logging

if TYPE_CHECKING:
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


@dataclass(frozen=True)
class KvGroup:
    """One of vLLM's KV cache groups as kvbm stores it: its layers, and the
    window vLLM frees its blocks behind (None: it keeps every block, as
    full attention and MLA do). With vLLM's hybrid manager a model has
    several (gpt-oss: full and sliding-window layers), each numbering its
    blocks apart; a slot holds every group's layers of one position."""

    layer_names: tuple[str, ...]
    window: AttentionWindow | None = None


@dataclass(frozen=True)
class EngineSetup:
    """One engine's connector settings, the same in the scheduler and the
    workers (they must agree on `async_copies`: the scheduler then keeps a
    saved request's blocks until the workers report its saves done).

    Invariant: while `off` is None, `geometry` and `model_identity` are
    known; a connector that is off never attaches to the node (its
    scheduler only tells a named node why, when `refusal` says so)."""

    cfg: KvbmConfig
    block_size: int
    ranks: int  # the engine's workers, each keying its own share of a block (block_key.py)
    stages: int  # pipeline stages (each of `ranks` / `stages` tensor-parallel workers)
    socket: str
    async_copies: bool  # copies started in one hook and finished in a later one
    promise_hits: bool  # kv_load_failure_policy "recompute": a view hit is promised unpinned
    off: str | None = None  # why the connector is off (the engine runs without it)
    model_geometry: ModelGeometry | None = None
    model_identity: str = ""
    groups: tuple[KvGroup, ...] = ()  # vLLM's KV cache groups (none known: one, full attention)
    private_node: subprocess.Popen | None = None  # the node this engine started for itself
    refusal: str | None = None  # off for the model: the kind the named node is told

    @property
    def geometry(self) -> ModelGeometry:
        assert self.model_geometry is not None, "the connector is off: " + str(self.off)
        return self.model_geometry

    @property
    def window(self) -> AttentionWindow | None:
        """The window that shapes a hit: the one every group has. None where
        a group keeps every block (the whole prefix must then be held), or
        where groups' windows differ (held whole too: a safe, smaller hit)."""
        windows = {g.window for g in self.groups}
        return windows.pop() if len(windows) == 1 else None

    @property
    def windowed(self) -> bool:
        """Some group's blocks are freed behind its window as requests run."""
        return any(g.window is not None for g in self.groups)

    @property
    def waits(self) -> bool:
        """Hits load asynchronously and fail whole (metadata.Load.waiting):
        vLLM rolls a failed block back to that block, behind which a
        window's blocks were never loaded, and with several groups it
        refuses failed blocks altogether."""
        return self.windowed or len(self.groups) > 1


def kv_transfer_config(extra: dict[str, Any], policy: str = "recompute") -> KVTransferConfig:
    """vLLM's `kv_transfer_config` for this connector (what the README's JSON says)."""
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="KvbmConnector",
        kv_connector_module_path=__name__.rpartition(".")[0],  # the package: its facade
        kv_role="kv_both",
        kv_load_failure_policy=policy,
        kv_connector_extra_config=extra,
    )


def engine_setup(
    vllm_config: VllmConfig,
    transfer: KVTransferConfig,
    kv_cache_config: KVCacheConfig | None,
) -> EngineSetup:
    """The setup of one connector instance. Whatever goes wrong here turns
    the connector off, never the engine."""
    extra = dict(transfer.kv_connector_extra_config or {})
    cfg = engine_config(extra)
    attach_logging(cfg.log_level)
    socket, private, off, refusal = cfg.socket, None, None, None
    geometry, identity, groups = None, "", ()
    about: str | None = "kv_cache"  # what a failure is about (engine_wire.REFUSAL_KINDS)
    try:
        geometry = geometry_of(vllm_config, kv_cache_config)
        groups = groups_of(kv_cache_config)
        about = "model_identity"
        identity = model_identity(vllm_config.model_config, vllm_config.parallel_config)
        about = None  # past here only the node fails, and it hears nothing then
        if "node" not in extra:
            socket, private = ensure_private_node(cfg)
    except Exception as e:  # a shape this code never met must not stop the engine either
        expected = isinstance(e, (KvbmError, ValueError, OSError))
        off = str(e) if expected else f"{type(e).__name__}: {e}"  # logged by refusal.py
        # a private node is not started just to hear why: no node named, none told
        refusal = about if "node" in extra else None
    promise = transfer.kv_load_failure_policy == "recompute"
    device = vllm_config.device_config.device_type
    return EngineSetup(
        cfg=cfg,
        block_size=block_span(vllm_config, kv_cache_config),
        ranks=vllm_config.parallel_config.tensor_parallel_size
        * vllm_config.parallel_config.pipeline_parallel_size,
        stages=vllm_config.parallel_config.pipeline_parallel_size,
        socket=socket,
        async_copies=cfg.engine_copies == "async"
        or (cfg.engine_copies == "auto" and device != "cpu"),
        promise_hits=promise,
        off=off,
        model_geometry=geometry,
        model_identity=identity,
        groups=groups,
        private_node=private,
        refusal=refusal,
    )


STORED_KINDS = (
    "FullAttentionSpec",
    "MLAAttentionSpec",
    "SlidingWindowSpec",
    "ChunkedLocalAttentionSpec",
)


def groups_of(kv_cache_config: KVCacheConfig | None) -> tuple[KvGroup, ...]:
    """vLLM's KV cache groups, each with the window vLLM frees its blocks
    behind (kinds checked by `geometry_of`). A full-attention spec that
    carries a sliding window (vLLM's hybrid manager off) keeps every
    block: no window there."""
    if kv_cache_config is None:
        return ()
    return tuple(
        KvGroup(tuple(g.layer_names), window_of(g.kv_cache_spec))
        for g in kv_cache_config.kv_cache_groups
    )


def window_of(spec: Any) -> AttentionWindow | None:
    """The window of one group's spec, if vLLM frees its blocks behind one."""
    kind = type(spec).__name__
    if kind == "SlidingWindowSpec":
        retained = getattr(spec, "extra_retained_tokens", 0) or 0
        return AttentionWindow("sliding", spec.sliding_window, spec.block_size, retained)
    if kind == "ChunkedLocalAttentionSpec":
        return AttentionWindow("chunked", spec.attention_chunk_size, spec.block_size)
    return None


def geometry_of(
    vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None = None
) -> ModelGeometry:
    """The geometry of vLLM's KV cache, from its cache groups' specs (the
    model's config where there are none) and the layout the engine core
    resolved before it made the scheduler and the workers. A slot holds
    every group's layers, so the groups must share one head shape; the
    geometry is then the same model's without the hybrid manager (one
    group of every layer), and engines with it on and off share blocks."""
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    specs = [g.kv_cache_spec for g in kv_cache_config.kv_cache_groups] if kv_cache_config else []
    packed = any(getattr(s, "state_content_bytes", None) is not None for s in specs)
    fp8 = None if packed else fp8_format(cc.cache_dtype)
    # A decode-context-parallel rank's block is a block of the geometry
    # (spec.block_size tokens, every n-th of vLLM's block: `block_span`).
    if getattr(pc, "prefill_context_parallel_size", 1) > 1:
        raise KvbmError(
            "kvbm does not store KV caches split by prefill_context_parallel_size > 1 yet"
        )
    most = stage_layers(mc, pc) or 0
    device = getattr(getattr(vllm_config, "device_config", None), "device_type", "")
    if getattr(mc, "use_mla", False) and device == "cpu":
        # Measured (tests/system/test_vllm_models.py): with vLLM's own prefix
        # cache forced on, vLLM alone answers as an engine fed from kvbm does.
        raise KvbmError(
            "vLLM's CPU MLA backend computes a prefill over a cached prefix otherwise than "
            "over the whole prompt (vLLM turns its own prefix cache off for it): kvbm stores "
            "no MLA cache on CPU"
        )
    layout = (
        getattr(kv_cache_config, "kv_cache_layout", None) or cc.kv_cache_layout or VLLM_CPU_LAYOUT
    )
    groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
    if not groups:
        if mc.get_sliding_window() is not None:
            raise KvbmError("kvbm needs vLLM's KV cache groups to tell a sliding window's blocks")
        return ModelGeometry(
            num_layers=max(mc.get_num_layers(pc), most),
            num_kv_heads=mc.get_num_kv_heads(pc),
            head_dim=mc.get_head_size(),
            block_size=cc.block_size,
            dtype=fp8 or str(mc.dtype).removeprefix("torch."),
            kv_layout=layout,
        )
    kinds = sorted({type(s).__name__ for s in specs})
    if not set(kinds) <= set(STORED_KINDS):
        raise KvbmError(
            f"kvbm stores KV cache groups of full, MLA, sliding-window or chunked-local "
            f"attention; this model has {len(groups)} group(s) of {kinds}"
        )
    shapes = {
        (
            s.num_kv_heads,
            s.head_size,
            s.head_size_v,
            s.dtype,
            s.block_size,
            type(s).__name__ == "MLAAttentionSpec",
        )
        for s in specs
    }
    if len(shapes) > 1:
        raise KvbmError(
            f"kvbm stores KV cache groups of one head shape (a slot holds every group's "
            f"layers); this model's {len(groups)} groups have {len(shapes)}"
        )
    spec = specs[0]
    if packed:
        return ModelGeometry(
            num_layers=max(sum(len(g.layer_names) for g in groups), most),
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.state_content_bytes,  # a token's bytes of a head: data and scales
            head_dim_v=0,
            block_size=spec.block_size,
            dtype=packed_format(spec),
            kv_layout=layout,
        )
    return ModelGeometry(
        num_layers=max(sum(len(g.layer_names) for g in groups), most),
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        head_dim_v=spec.head_size_v,
        block_size=spec.block_size,
        dtype=fp8 or str(spec.dtype).removeprefix("torch."),
        kv_layout=layout,
    )


def block_span(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None) -> int:
    """The tokens of one of vLLM's blocks, which kvbm keys: under decode
    context parallelism n ranks each hold every n-th token of it (runs of
    the interleave size) in a block of their own cache (vLLM's
    `resolve_dcp_kv_block_size`); each rank keys its share with its rank."""
    dcp = getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1)
    groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
    if groups and not all(getattr(g.kv_cache_spec, "dcp_sharded", False) for g in groups):
        dcp = 1
    return vllm_config.cache_config.block_size * dcp


def stage_layers(model_config: Any, parallel_config: Any) -> int | None:
    """The most layers a pipeline stage holds (None without pipeline
    parallelism). One geometry serves every stage's share of a block (its
    keys' rank tells the stage), so it has that many layers: a stage of
    fewer fills the first slot layers and zeroes the rest
    (kvbm/connector/engine_kv.py). The scheduler sees the first stage's
    layers alone, hence the count from the model's partition of its layers
    (vLLM's `get_pp_indices`, VLLM_PP_LAYER_PARTITION included)."""
    pp = getattr(parallel_config, "pipeline_parallel_size", 1)
    if pp <= 1:
        return None
    from vllm.distributed.utils import get_pp_indices

    total = model_config.get_total_num_hidden_layers()
    return max(end - start for start, end in (get_pp_indices(total, r, pp) for r in range(pp)))


def packed_format(spec: Any) -> str:
    """The element format of a packed page (`state_content_bytes`: each
    head's K and V data and their scales, C bytes a token), named by vLLM's
    quantization mode. vLLM views such a page as [B, H, N, C] of bytes for
    the per-token-head modes (kvbm/layout.py's PACKED_MODES); other packings
    (several tokens a state, heads packed otherwise) are refused."""
    mode = str(getattr(getattr(spec, "kv_quant_mode", None), "name", "")).lower()
    slots = getattr(spec, "num_head_slots", None)
    if (
        mode not in PACKED_MODES
        or getattr(spec, "tokens_per_state", 1) != 1
        or slots not in (None, spec.num_kv_heads)
    ):
        raise KvbmError(f"kvbm does not store packed KV pages of {mode or 'this'} mode yet")
    return f"packed-{mode}"


def fp8_format(cache_dtype: str | None) -> str | None:
    """The element format of an fp8 KV cache (None for the model's dtype).
    vLLM keeps fp8 caches in uint8 tensors and names e4m3 "fp8" or
    "fp8_e4m3" whatever the platform's format; the platform says which
    format that is. Other quantized caches are refused (KvbmError)."""
    if cache_dtype in ("auto", None):
        return None
    if cache_dtype == "fp8_e5m2":
        return "float8_e5m2"
    if cache_dtype in ("fp8", "fp8_e4m3"):
        from vllm.platforms import current_platform

        return str(current_platform.fp8_dtype()).removeprefix("torch.")
    raise KvbmError(f"kvbm does not store a {cache_dtype} KV cache yet")
