"""Model surgery for structured pruning: cut FFN channels, KV groups or whole decoder layers.

Surgery happens in place on the loaded model (no second copy of the weights): projections are
replaced by smaller nn.Linear modules holding the kept rows/columns, the module attributes the
forward pass reads (intermediate_size, num_key_value_heads, layer_idx) are updated, and the
shared config is rewritten so save_pretrained writes a config that reloads to the same shapes.
Knows the separate q/k/v/o and gate/up/down layout (with or without biases) and Phi-3's fused
qkv_proj / gate_up_proj, per-head and full-width (OLMo 2) q/k norms, explicit head_dim, and
per-layer config lists (Gemma 3's layer_types, SmolLM3's no_rope_layers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slmops.model.hf import decoder_layers

if TYPE_CHECKING:
    import torch

# Config lists with one entry per decoder layer, sliced when layers are dropped.
PER_LAYER_CONFIG_LISTS = ("layer_types", "no_rope_layers")


def _sliced_linear(old: torch.nn.Linear, *, rows: Any = None, cols: Any = None) -> torch.nn.Linear:
    """A new Linear with only the given output rows and/or input columns of `old`."""
    import torch

    w = old.weight.detach()
    b = old.bias.detach() if old.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None and new.bias is not None:
            new.bias.copy_(b)
    return new


def dims(config: Any) -> dict[str, int]:
    """The shape-defining numbers of a config, for the card's before/after."""
    heads = int(config.num_attention_heads)
    return {
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(config.intermediate_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "num_attention_heads": heads,
        "num_key_value_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
    }


# ---- FFN channels ---------------------------------------------------------------------------


def ffn_parts(mlp: Any) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """(gate weight, up weight, down_proj) of an MLP, splitting Phi-3's fused gate_up_proj."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj.weight.detach().chunk(2, dim=0)
        return gate, up, mlp.down_proj
    return mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach(), mlp.down_proj


def ffn_magnitude_scores(model: Any) -> list[torch.Tensor]:
    """Per layer, per intermediate channel: L2 norm of its gate row, up row and down column."""
    scores = []
    for layer in decoder_layers(model):
        gate, up, down = ffn_parts(layer.mlp)
        sq = gate.pow(2).sum(1) + up.pow(2).sum(1) + down.weight.detach().pow(2).sum(0)
        scores.append(sq.sqrt())
    return scores


def cut_ffn(model: Any, keep: list[torch.Tensor]) -> None:
    """Keep the given intermediate channels (same count in every layer) and fix the config."""
    import torch

    for layer, idx in zip(decoder_layers(model), keep, strict=True):
        mlp = layer.mlp
        if hasattr(mlp, "gate_up_proj"):
            width = mlp.gate_up_proj.out_features // 2
            mlp.gate_up_proj = _sliced_linear(mlp.gate_up_proj, rows=torch.cat([idx, idx + width]))
        else:
            mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=idx)
            mlp.up_proj = _sliced_linear(mlp.up_proj, rows=idx)
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = int(idx.numel())
    model.config.intermediate_size = int(keep[0].numel())


# ---- attention KV groups --------------------------------------------------------------------


def _group_rows(group: int, size: int) -> range:
    return range(group * size, (group + 1) * size)


def head_magnitude_scores(model: Any) -> list[torch.Tensor]:
    """Per layer, per KV group: L2 norm of every weight the group owns (q, k, v rows, o cols)."""
    import torch

    d = dims(model.config)
    hd, nq, nkv = d["head_dim"], d["num_attention_heads"], d["num_key_value_heads"]
    per_group = nq // nkv
    out = []
    for layer in decoder_layers(model):
        q, k, v, o = attention_weights(layer.self_attn, nq, nkv, hd)
        scores = []
        for g in range(nkv):
            qr = list(_group_rows(g, per_group * hd))
            kv = list(_group_rows(g, hd))
            sq = q[qr].pow(2).sum() + k[kv].pow(2).sum() + v[kv].pow(2).sum()
            scores.append(float((sq + o[:, qr].pow(2).sum()).sqrt()))
        out.append(torch.tensor(scores))
    return out


def attention_weights(
    attn: Any, nq: int, nkv: int, hd: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v weights (split from Phi-3's fused qkv_proj if needed) and o_proj weight."""
    o = attn.o_proj.weight.detach()
    if hasattr(attn, "qkv_proj"):
        w = attn.qkv_proj.weight.detach()
        q, k, v = w.split([nq * hd, nkv * hd, nkv * hd], dim=0)
        return q, k, v, o
    return attn.q_proj.weight.detach(), attn.k_proj.weight.detach(), attn.v_proj.weight.detach(), o


def cut_kv_groups(model: Any, keep: list[list[int]]) -> None:
    """Keep the given KV groups (same count per layer): each KV head with its query heads.

    HF's repeat_kv maps query head h to KV head h // (num_heads // num_kv_heads), so a group is
    one KV head plus a contiguous block of query heads; removing whole groups keeps GQA valid.
    head_dim is written explicitly because hidden_size / num_heads no longer equals it.
    """
    import torch

    d = dims(model.config)
    hd, nq, nkv = d["head_dim"], d["num_attention_heads"], d["num_key_value_heads"]
    per_group = nq // nkv
    for layer, groups in zip(decoder_layers(model), keep, strict=True):
        attn = layer.self_attn
        q_rows = torch.tensor([r for g in groups for r in _group_rows(g, per_group * hd)])
        kv_rows = torch.tensor([r for g in groups for r in _group_rows(g, hd)])
        if hasattr(attn, "qkv_proj"):
            rows = torch.cat([q_rows, nq * hd + kv_rows, (nq + nkv) * hd + kv_rows])
            attn.qkv_proj = _sliced_linear(attn.qkv_proj, rows=rows)
        else:
            attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
            attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
            attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows)
        _slice_full_width_norm(attn, "q_norm", q_rows, nq * hd)
        _slice_full_width_norm(attn, "k_norm", kv_rows, nkv * hd)
        for attr, value in (
            ("num_key_value_heads", len(groups)),
            ("num_heads", len(groups) * per_group),
        ):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
    kept = len(keep[0])
    model.config.num_attention_heads = kept * per_group
    model.config.num_key_value_heads = kept
    model.config.head_dim = hd


def _slice_full_width_norm(attn: Any, name: str, rows: torch.Tensor, width: int) -> None:
    """OLMo 2 normalises the whole q (or k) projection: keep the kept heads' weights. Per-head
    norms (Qwen3, Gemma 3: weight of size head_dim) are shared by every head and stay as they are."""
    import torch

    norm: Any = getattr(attn, name, None)
    weight = getattr(norm, "weight", None)
    if norm is None or weight is None or weight.numel() != width or width == rows.numel():
        return
    norm.weight = torch.nn.Parameter(weight.detach().index_select(0, rows).clone())
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (int(rows.numel()),)


# ---- whole layers ---------------------------------------------------------------------------


def cut_layers(model: Any, keep: list[int]) -> None:
    """Keep the given decoder layers, renumber their layer_idx, and fix per-layer config lists."""
    import torch

    body = model.model
    old = list(body.layers)
    body.layers = torch.nn.ModuleList([old[i] for i in keep])
    for new_idx, layer in enumerate(body.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    config = model.config
    for key in PER_LAYER_CONFIG_LISTS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == len(old):
            setattr(config, key, [value[i] for i in keep])
    config.num_hidden_layers = len(keep)
