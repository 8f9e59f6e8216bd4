"""Knowledge Transfer Graphs: JSON round trip, presets, bad graphs, one training step's gradients."""
import json

import pytest
import torch

from common.graph import (GATES, LOSSES, check_graph, draw_attention, draw_graph, load_graph, preset, sample_graph,
                          untrained_nodes)
from common.launch import UserError
from common.models import create_model
from ktg_ensemble import graph_loss, node_outputs


def test_presets():
    independent = preset("independent", ["resnet8", "resnet8", "resnet8"])
    assert [(e["source"], e["target"], e["loss"]) for e in independent["edges"]] == [("label", t, "ce")
                                                                                      for t in range(3)]
    dml = preset("dml", ["resnet8"] * 3)
    peer_edges = [e for e in dml["edges"] if e["source"] != "label"]
    assert len(peer_edges) == 6 and all(e["loss"] == "prob_attract" and e["gate"] == "through" for e in peer_edges)


def test_json_round_trip(tmp_path):
    graph = preset("dml", ["resnet20_abn", "resnet8"])
    graph["edges"][2].update(loss="both_repel", gate="correct")
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(graph))
    assert load_graph(path) == graph
    assert load_graph(path, nodes=["resnet20_abn", "resnet8"]) == graph


def edge(source, target, loss="prob_attract", gate="through"):
    return {"source": source, "target": target, "loss": loss, "gate": gate}


@pytest.mark.parametrize("edges, message", [
    ([edge(1, 0, loss="prob_magnet")], "unknown loss 'prob_magnet'"),
    ([edge(1, 0, gate="sometimes")], "unknown gate 'sometimes'"),
    ([edge("label", 0, loss="prob_attract")], "unknown loss 'prob_attract'"),  # label edges are CE
    ([edge(3, 0)], "node 3 is not the label or a node index"),
    ([edge(0, -1)], "node -1 is not"),
    ([edge(0, True)], "node True is not"),  # JSON's true is no node index (Python's bool is an int)
    ([edge(0, "label")], "no edge can go into the label"),
    ([edge(1, 0), edge(1, 0, gate="linear")], "a second edge from 1 to 0"),
    ([edge(1, 1)], "cannot teach itself"),
    ([{"source": 1, "target": 0}], "exactly source, target, loss and gate"),
])
def test_bad_graphs_are_refused(edges, message):
    with pytest.raises(UserError, match=message):
        check_graph({"nodes": ["resnet8", "resnet8", "resnet8"], "edges": edges})


def test_a_node_no_edge_trains_is_refused():
    graph = preset("dml", ["resnet8"] * 3)
    for e in graph["edges"]:
        if e["target"] == 2:
            e["gate"] = "cutoff"
    assert untrained_nodes(graph) == [2]
    with pytest.raises(UserError, match=r"node 2 \(resnet8\) has no incoming edge that is not cut off"):
        check_graph(graph)
    graph["edges"][-1]["gate"] = "linear"  # one peer edge into node 2 is enough
    assert untrained_nodes(check_graph(graph)) == []


def test_bad_node_lists_are_refused(tmp_path):
    with pytest.raises(UserError, match="2 to 8 network nodes"):
        check_graph({"nodes": ["resnet8"], "edges": []})
    with pytest.raises(UserError, match="2 to 8 network nodes"):
        check_graph({"nodes": ["resnet8"] * 9, "edges": []})
    with pytest.raises(UserError, match="do not match --nodes"):
        check_graph(preset("dml", ["resnet8", "resnet8"]), nodes=["resnet8", "resnet14"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="is not JSON"):
        load_graph(tmp_path / "bad.json")
    with pytest.raises(UserError, match="neither a preset"):
        load_graph(tmp_path / "missing.json")


def test_sampled_graph_has_every_edge():
    import optuna
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    graph = sample_graph(study.ask(), ["resnet20_abn"] * 3)
    assert len(graph["edges"]) == 3 + 6
    assert all(e["loss"] in LOSSES and e["gate"] in GATES for e in graph["edges"] if e["source"] != "label")


def test_graph_picture(tmp_path):
    graph = preset("dml", ["resnet8"] * 3)
    graph["edges"][3]["gate"] = "cutoff"
    fig = draw_graph(tmp_path / "graph.png", graph, {0: 50.0, 1: 51.0, 2: 52.0, "ensemble": 55.0})
    ax = fig.axes[0]
    arrows = [a for a in ax.texts if type(a).__name__ == "Annotation"]
    # 3 label edges + 6 peer edges, one of them cut off (not drawn), and 3 dashed arrows into the ensemble
    assert len(arrows) == 3 + 5 + 3
    boxes = [t.get_text() for t in ax.texts if type(t).__name__ == "Text" and t.get_bbox_patch() is not None]
    assert boxes == ["label", "0: resnet8\n50.0 %", "1: resnet8\n51.0 %", "2: resnet8\n52.0 %", "ensemble\n55.0 %"]
    edge_labels = [t.get_text() for t in ax.texts if type(t).__name__ == "Text" and t.get_bbox_patch() is None]
    assert edge_labels.count("prob +") == 5 and edge_labels.count("ce") == 3
    # each label sits on its arc: the middle of the arrow's curve from the source node to the target node
    from matplotlib.patches import ConnectionStyle
    labels = iter(t for t in ax.texts if type(t).__name__ == "Text" and t.get_bbox_patch() is None)
    for arrow in arrows[:3 + 5]:
        start, control, end = ConnectionStyle.Arc3(rad=0.15).connect(arrow.xyann, arrow.xy).vertices
        assert next(labels).get_position() == pytest.approx(tuple(0.25 * start + 0.5 * control + 0.25 * end))
    assert [text.get_text() for text in ax.get_legend().get_texts()] == ["through", "linear", "correct",
                                                                         "cutoff (not drawn)"]


def test_attention_picture(tmp_path):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    maps = [torch.rand(2, 16, 16), torch.rand(2, 16, 16)]
    fig = draw_attention(tmp_path / "attention.png", images, maps, ["0: resnet8_abn", "1: resnet8_abn"],
                         ["cat", "dog"], [["cat", "cat"], ["cat", "dog"]])
    assert len(fig.axes) == 2 * 3 + 1  # a row per image: the image, then each node's map over it; a colour bar
    assert fig.axes[-1].get_ylabel() == "attention" and fig.axes[-1].get_ylim() == (0, 1)
    titles = [ax.get_title() for ax in fig.axes[:-1]]
    assert titles == ["label: cat", "0: resnet8_abn\n→ cat", "1: resnet8_abn\n→ cat",
                      "label: dog", "0: resnet8_abn\n→ cat", "1: resnet8_abn\n→ dog"]
    assert fig.axes[4].title.get_color() == "red" and fig.axes[5].title.get_color() == "black"  # wrong, right
    heat = fig.axes[1].get_images()[1].get_array()  # the map, upsampled to the image
    assert heat.shape == (32, 32) and 0 <= heat.min() and heat.max() <= 1


def test_an_edge_trains_its_target_only():
    torch.manual_seed(0)
    nodes = [create_model("resnet8_abn", 10, 32) for _ in range(2)]
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for kind in LOSSES:
        graph = {"nodes": ["resnet8_abn"] * 2, "edges": [edge(0, 1, loss=kind)]}
        outputs = [node_outputs(node, images) for node in nodes]
        sum(graph_loss(graph, outputs, labels, 1, 10, (3, 7)).values()).backward()
        assert all(p.grad.abs().sum() == 0 for p in nodes[0].parameters()), kind  # the source: zero gradient
        assert sum(p.grad.abs().sum() for p in nodes[1].parameters()) > 0, kind
        for node in nodes:
            node.zero_grad()


def test_optuna_plots_leave_the_global_style_alone(tmp_path):
    import matplotlib.pyplot as plt
    import optuna

    from common.study import search_picture

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study()
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1) ** 2, n_trials=3)
    before = plt.rcParams["axes.facecolor"]
    search_picture(tmp_path / "search.png", study)
    assert plt.rcParams["axes.facecolor"] == before  # ggplot's would be grey
