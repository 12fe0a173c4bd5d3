import torch

from camelot.rope import RopeSpec, place_keys, place_queries_for_memory, unrotate_keys


def _spec(dim=16, scaling=1.0, partial=None):
    rd = partial or dim
    inv = 1.0 / (10000 ** (torch.arange(0, rd, 2).float() / rd))
    return RopeSpec(inv, scaling)


def test_unrotate_inverts_hf_rotation():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    spec = _spec()
    k = torch.randn(2, 3, 10, 16)
    pos = torch.arange(5, 15)
    freqs = pos[:, None].float() * spec.inv_freq
    emb = torch.cat([freqs, freqs], -1)
    _, k_rot = apply_rotary_pos_emb(k, k, emb.cos()[None], emb.sin()[None])
    assert torch.allclose(unrotate_keys(spec, k_rot, pos), k, atol=1e-5)
    assert torch.allclose(place_keys(spec, k, pos), k_rot, atol=1e-5)


def test_partial_rotary_and_scaling_roundtrip():
    spec = _spec(dim=16, scaling=1.7, partial=8)
    k = torch.randn(1, 2, 6, 16)
    pos = torch.arange(-3, 3)
    placed = place_keys(spec, k, pos)
    assert torch.equal(placed[..., 8:], k[..., 8:] * 1.7)
    assert torch.allclose(unrotate_keys(spec, placed, pos), k, atol=1e-5)


def test_query_placement_equals_key_placement():
    # q_p . (key placed at -d) must equal (query moved by +d) . raw key: memory never rotates.
    spec = _spec(scaling=1.3)
    q_raw, k = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 7, 16)
    q_pos = torch.arange(10, 14)
    q_rot = place_keys(spec, q_raw, q_pos)
    for d in (0, 1, 128):
        k_placed = place_keys(spec, k, torch.full((7,), -d))
        ref = q_rot @ k_placed.transpose(-1, -2)
        got = place_queries_for_memory(spec, q_rot, d) @ k.transpose(-1, -2)
        assert torch.allclose(got, ref, atol=1e-4)
