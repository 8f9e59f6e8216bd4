"""Knowledge Transfer Graphs: what they are as JSON, the presets, and their pictures.

A graph has M network nodes (`nodes`, model names), the label, and an ensemble
node (the mean of the network nodes' logits, eq. 5) that has no edges. Each edge
trains its `target` node from its `source` (a node index or "label") with a
`loss` and a `gate`:

    {"nodes": ["resnet20_abn", "resnet20_abn"],
     "edges": [{"source": "label", "target": 0, "loss": "ce", "gate": "through"},
               {"source": 1, "target": 0, "loss": "prob_attract", "gate": "linear"}]}

Used by ktg_ensemble.py and bench.py.
"""
import json
import math
from pathlib import Path

from common.launch import UserError

LABEL = "label"
LOSSES = ("prob_attract", "prob_repel", "att_attract", "att_repel", "both_attract", "both_repel")
GATES = ("through", "cutoff", "linear", "correct")
GATE_COLOURS = {"through": "tab:blue", "linear": "tab:green", "correct": "tab:orange", "cutoff": "lightgrey"}
MAX_NODES = 8


def preset(name, nodes):
    """`independent`: label edges only; `dml`: and prob_attract/through between every pair (DML)."""
    edges = [{"source": LABEL, "target": t, "loss": "ce", "gate": "through"} for t in range(len(nodes))]
    if name == "dml":
        edges += [{"source": s, "target": t, "loss": "prob_attract", "gate": "through"}
                  for t in range(len(nodes)) for s in range(len(nodes)) if s != t]
    return {"nodes": list(nodes), "edges": edges}


def check_graph(graph, nodes=None):
    """Refuse a malformed graph with one clear message; `nodes`, if given, must match its nodes."""
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list) or \
            not isinstance(graph.get("edges"), list):
        raise UserError('a graph is {"nodes": [model names], "edges": [edges]}')
    count = len(graph["nodes"])
    if not 2 <= count <= MAX_NODES:
        raise UserError(f"a graph has 2 to {MAX_NODES} network nodes, this one {count}")
    if nodes and list(nodes) != graph["nodes"]:
        raise UserError(f"the graph's nodes {graph['nodes']} do not match --nodes {list(nodes)}")
    seen = set()
    for edge in graph["edges"]:
        if not isinstance(edge, dict) or set(edge) != {"source", "target", "loss", "gate"}:
            raise UserError(f"edge {edge}: an edge has exactly source, target, loss and gate")
        source, target = edge["source"], edge["target"]
        if target == LABEL:
            raise UserError(f"edge {edge}: no edge can go into the label")
        for end in (source, target):
            if end != LABEL and not (isinstance(end, int) and not isinstance(end, bool) and 0 <= end < count):
                raise UserError(f"edge {edge}: node {end!r} is not the label or a node index 0..{count - 1}")
        if source == target:
            raise UserError(f"edge {edge}: a node cannot teach itself")
        allowed = ("ce",) if source == LABEL else LOSSES
        if edge["loss"] not in allowed:
            raise UserError(f"edge {edge}: unknown loss {edge['loss']!r}, use one of {', '.join(allowed)}")
        if edge["gate"] not in GATES:
            raise UserError(f"edge {edge}: unknown gate {edge['gate']!r}, use one of {', '.join(GATES)}")
        if (source, target) in seen:
            raise UserError(f"edge {edge}: a second edge from {source} to {target}")
        seen.add((source, target))
    for node in untrained_nodes(graph):
        raise UserError(f"node {node} ({graph['nodes'][node]}) has no incoming edge that is not cut off: it would "
                        f"keep its random weights and still vote in the ensemble")
    return graph


def untrained_nodes(graph):
    """The nodes that no edge trains: every incoming edge, if any, is cut off."""
    trained = {edge["target"] for edge in graph["edges"] if edge["gate"] != "cutoff"}
    return [node for node in range(len(graph["nodes"])) if node not in trained]


def load_graph(path, nodes=None):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--graph: {path} is neither a preset (independent, dml) nor a file")
    try:
        graph = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--graph: {path} is not JSON: {error}") from None
    return check_graph(graph, nodes)


def sample_graph(trial, nodes, losses=LOSSES):
    """A search trial's graph: a loss type (from `losses`) and a gate for every edge
    between network nodes, a gate for every label edge (seed 002, section 3.2)."""
    edges = [{"source": LABEL, "target": t, "loss": "ce",
              "gate": trial.suggest_categorical(f"label_to_{t}_gate", GATES)} for t in range(len(nodes))]
    for t in range(len(nodes)):
        for s in range(len(nodes)):
            if s != t:
                edges.append({"source": s, "target": t, "loss": trial.suggest_categorical(f"{s}_to_{t}_loss", losses),
                              "gate": trial.suggest_categorical(f"{s}_to_{t}_gate", GATES)})
    return {"nodes": list(nodes), "edges": edges}


# --- pictures ---------------------------------------------------------------


ARC = 0.15  # the bend of an edge's arrow (matplotlib's arc3 rad): A→B and B→A curve apart


def draw_graph(path, graph, accuracies=None):
    """Like seed 002's Fig. 2: the label, the network nodes and the ensemble node;
    edges coloured by gate (cutoff edges left out) and labelled by loss type.
    Returns the figure."""
    from common.folder import pyplot, save_figure

    plt = pyplot()

    # the label, the network nodes and the ensemble on one circle: no edge crosses a node
    count = len(graph["nodes"])
    ring = [LABEL, *range(count), "ensemble"]
    where = {key: (math.sin(2 * math.pi * i / len(ring)), math.cos(2 * math.pi * i / len(ring)))
             for i, key in enumerate(ring)}
    fig, ax = plt.subplots(figsize=(7, 7))
    for edge in graph["edges"]:
        if edge["gate"] == "cutoff":
            continue
        (x0, y0), (x1, y1) = where[edge["source"]], where[edge["target"]]
        colour = GATE_COLOURS[edge["gate"]]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="-|>", color=colour, lw=1.8, shrinkA=22,
                                                            shrinkB=22, connectionstyle=f"arc3,rad={ARC}"))
        text = edge["loss"].replace("_attract", " +").replace("_repel", " −")
        # on the arc: the middle of arc3's quadratic Bézier lies ARC/2 of the edge's length to its right
        ax.text((x0 + x1) / 2 + ARC / 2 * (y1 - y0), (y0 + y1) / 2 - ARC / 2 * (x1 - x0), text, color=colour,
                fontsize=8, ha="center", va="center")
    for m in range(count):
        ax.annotate("", where["ensemble"], where[m], arrowprops=dict(arrowstyle="-|>", color="grey", ls="--",
                                                                    shrinkA=22, shrinkB=22))
    for key, (x, y) in where.items():
        if key == LABEL:
            text, colour = "label", "white"
        elif key == "ensemble":
            text, colour = "ensemble", "salmon"
        else:
            text, colour = f"{key}: {graph['nodes'][key]}", "lightgrey"
        if accuracies and key in accuracies:
            text += f"\n{accuracies[key]:.1f} %"
        ax.text(x, y, text, ha="center", va="center", fontsize=9,
                bbox=dict(boxstyle="round", facecolor=colour, edgecolor="black"))
    for gate_name, colour in GATE_COLOURS.items():
        ax.plot([], [], color=colour, lw=2, label=gate_name + (" (not drawn)" if gate_name == "cutoff" else ""))
    ax.legend(loc="lower right", title="gate", fontsize=8)
    ax.set(xlim=(-1.4, 1.4), ylim=(-1.4, 1.4), aspect="equal")
    ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path)
    return fig


def draw_attention(path, images, maps, names, labels, predictions):
    """Like seed 002's Fig. 3: test images (rows, uint8 3×H×W) with their true
    `labels`, and each node's attention map over them (columns) under the node's
    prediction (`predictions[node][row]`). Returns the figure."""
    import torch.nn.functional as F

    from common.folder import pyplot, save_figure

    plt = pyplot()
    rows, columns = len(images), 1 + len(maps)
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.2 * rows), squeeze=False)
    for r, image in enumerate(images):
        picture = image.permute(1, 2, 0).cpu().numpy()
        axes[r, 0].imshow(picture)
        axes[r, 0].set_title(f"label: {labels[r]}", fontsize=8)
        for c, node_maps in enumerate(maps, start=1):
            heat = F.interpolate(node_maps[r][None, None].float(), size=image.shape[-2:], mode="bilinear")[0, 0]
            axes[r, c].imshow(picture)
            shown = axes[r, c].imshow(heat.cpu().numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            predicted = predictions[c - 1][r]
            axes[r, c].set_title(f"{names[c - 1]}\n→ {predicted}", fontsize=8,
                                 color="black" if predicted == labels[r] else "red")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    if maps:  # what the colours mean: the attention map's value, 0 to 1
        fig.colorbar(shown, ax=axes[:, 1:].ravel().tolist(), label="attention", shrink=0.8)
    save_figure(fig, path)
    return fig
