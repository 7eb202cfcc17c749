"""The caching policy of the vision tower's CUDA graphs (no GPU needed: the capture itself is
tested in tests/gpu/test_vision_graphs_gpu.py), driven the way the tower's forward drives it:
`decide` on every forward, then a replay of a kept graph or a capture (`admit`)."""

from __future__ import annotations

from megatron_latent.models.qwen25vl.vision_graphs import VisionGraphs

WEIGHTS = (1000, 2000)  # where the weights live (data pointers)


def forward(g: VisionGraphs, key, storage=WEIGHTS) -> str:
    """'eager', 'capture' or 'replay' for one forward of layout `key`."""
    if not g.decide(key, storage) or g.disabled_reason:
        return "eager"
    if key in g.entries:
        return "replay"
    g.admit(key, object())
    return "capture"


def test_captured_on_the_second_sighting_then_replayed():
    g = VisionGraphs(capacity=4)
    assert [forward(g, "A") for _ in range(4)] == ["eager", "capture", "replay", "replay"]
    assert (g.captures, g.replays) == (1, 2)
    assert [forward(g, "B"), forward(g, "A"), forward(g, "B")] == ["eager", "replay", "capture"]


def test_moved_weights_drop_every_graph():
    g = VisionGraphs(capacity=4)
    forward(g, "A"), forward(g, "A")
    assert forward(g, "A") == "replay"
    moved = (3000, 4000)  # .cpu() then .cuda(): new memory
    assert [forward(g, "A", moved) for _ in range(3)] == ["eager", "capture", "replay"]


def test_lru_keeps_the_recent_layouts():
    g = VisionGraphs(capacity=2)
    for key in "ABC":  # each captured on its second sighting; C evicts A (least recent)
        forward(g, key), forward(g, key)
    assert list(g.entries) == ["B", "C"]
    assert forward(g, "B") == "replay"
    assert [forward(g, "A"), forward(g, "A")] == ["eager", "capture"]  # sighted afresh
    assert list(g.entries) == ["B", "A"]  # C was the least recently used


def test_layouts_that_never_repeat_never_capture():
    g = VisionGraphs(capacity=4)
    assert all(forward(g, ("layout", i)) == "eager" for i in range(100))
    assert g.captures == 0 and g.disabled_reason is None


def test_thrashing_turns_graphs_off():
    # capacity 1 and two layouts in turn: every capture evicts the other graph before reuse
    g = VisionGraphs(capacity=1)
    outcomes = [forward(g, key) for _ in range(20) for key in "AB"]
    assert g.disabled_reason and "change too often" in g.disabled_reason
    assert g.captures == 5  # > 4 x capacity with no replays
    assert outcomes[-1] == "eager" and not g.entries


def test_teardown_drops_every_graph():
    """parallel.destroy drops the graphs through the registry (a graph holding an NCCL
    collective blocks the communicators' teardown); the tower captures again when next used."""
    from megatron_latent.platform import graph_registry

    g = VisionGraphs(capacity=4)
    assert [forward(g, "A") for _ in range(3)] == ["eager", "capture", "replay"]
    assert graph_registry.drop_all() >= 1
    assert not g.entries
    assert [forward(g, "A") for _ in range(3)] == ["eager", "capture", "replay"]
