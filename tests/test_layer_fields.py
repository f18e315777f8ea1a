"""vr_plugin.layer_fields: every per-layer config field follows a removal by meaning (pure Python)."""

import pytest

from vr_plugin.layer_fields import LayerFieldError, plan_layer_fields

KEEP = [0, 1, 3, 4, 6, 7]  # layers 2 and 5 of 8 removed


def plan(fields, keep=KEEP, depth=8):
    return plan_layer_fields(fields, keep, depth)


def test_index_lists_are_remapped_not_sliced():
    # Llama 4 with one MoE index per layer: as long as the depth, but indices, so [0..5], never [0,1,3,4,6,7]
    updates, warnings = plan({"num_hidden_layers": 8, "moe_layers": list(range(8))})
    assert updates == {"num_hidden_layers": 6, "moe_layers": [0, 1, 2, 3, 4, 5]} and not warnings
    assert plan({"moe_layers": [1, 3, 5, 7]})[0] == {"moe_layers": [1, 2, 5]}  # interleaved; 5 removed
    assert plan({"cross_attention_layers": [3, 6]})[0] == {"cross_attention_layers": [2, 4]}  # Mllama
    assert plan({"mlp_only_layers": [4]})[0] == {"mlp_only_layers": [3]}  # Qwen3-VL-MoE
    assert plan({"mlp_only_layers": [2, 4]})[0] == {"mlp_only_layers": [3]}  # a removed layer drops out


def test_per_layer_lists_are_sliced():
    types = [f"t{i}" for i in range(8)]
    updates, _ = plan({"layer_types": types, "no_rope_layers": [1, 1, 1, 0, 1, 1, 1, 0]})
    assert updates == {"layer_types": ["t0", "t1", "t3", "t4", "t6", "t7"], "no_rope_layers": [1, 1, 0, 1, 1, 0]}
    with pytest.raises(LayerFieldError, match="layer_types has 7 entries for 8 layers"):
        plan({"layer_types": types[:7]})


def test_thresholds_count_the_kept_layers_below():
    assert plan({"first_k_dense_replace": 3, "max_window_layers": 5})[0] == {
        "first_k_dense_replace": 2,
        "max_window_layers": 4,
    }
    assert plan({"max_window_layers": 80})[0] == {"max_window_layers": 6}  # every layer below: all still below


def test_decoder_sparse_step_kept_when_it_still_fits_else_made_explicit():
    # step 2: MoE at 1, 3, 5, 7. Removing 6 and 7 keeps 0..5, where the rule still gives MoE at 1, 3, 5
    fields = {"num_experts": 4, "decoder_sparse_step": 2, "mlp_only_layers": []}
    assert plan(fields, keep=[0, 1, 2, 3, 4, 5])[0] == {}
    # removing 2 and 5 keeps MoE layers 1, 3, 7 at new positions 1, 2, 5: no step expresses that
    updates, _ = plan(fields)
    assert updates == {"decoder_sparse_step": 1, "mlp_only_layers": [0, 3, 4]}
    moe_after = [j not in updates["mlp_only_layers"] for j in range(6)]
    assert moe_after == [KEEP[j] in (1, 3, 5, 7) for j in range(6)]
    assert plan({"num_experts": 0, "decoder_sparse_step": 2})[0] == {}  # no experts: nothing to say


def test_kv_sharing_is_refused_naming_the_field():
    with pytest.raises(LayerFieldError, match="num_kv_shared_layers=2"):
        plan({"num_hidden_layers": 8, "num_kv_shared_layers": 2})
    assert plan({"num_kv_shared_layers": 0})[0] == {}


def test_unknown_layer_like_fields_warn():
    updates, warnings = plan({"special_layers": [2, 6], "eos_token_id": [1, 2], "vision_feature_layer": [3, 5]})
    assert updates == {} and len(warnings) == 1 and "special_layers=[2, 6] looks like layer indices" in warnings[0]
    updates, warnings = plan({"attn_block_ids": list(range(8))})
    assert updates == {"attn_block_ids": KEEP} and "could be per-layer values or layer indices" in warnings[0]
    assert plan({"architectures": ["A"] * 8, "some_floats": [0.5] * 8}) == ({"some_floats": [0.5] * 6}, [])
