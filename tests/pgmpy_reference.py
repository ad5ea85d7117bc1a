"""Rebuild a pgmpy network from the saved causal_network.json (for independent checks)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pgmpy.factors.discrete import TabularCPD
from pgmpy.inference import VariableElimination
from pgmpy.models import DiscreteBayesianNetwork


def load_pgmpy(path: Path) -> DiscreteBayesianNetwork:
    doc = json.loads(Path(path).read_text())
    cards = {n["name"]: len(n["states"]) for n in doc["nodes"]}
    model = DiscreteBayesianNetwork()
    model.add_nodes_from(list(cards))
    model.add_edges_from([(p, n["name"]) for n in doc["nodes"] for p in n["parents"]])
    for n in doc["nodes"]:
        ps = n["parents"]
        model.add_cpds(TabularCPD(n["name"], cards[n["name"]], np.asarray(n["cpd"]), evidence=ps or None,
                                  evidence_card=[cards[p] for p in ps] or None,
                                  state_names={v: list(range(cards[v])) for v in [n["name"], *ps]}))
    model.check_model()
    return model


def do_query(model: DiscreteBayesianNetwork, concept: str, state: int, evidence: dict[str, int],
             outcome: str = "Y") -> np.ndarray:
    """P(outcome | do(concept = state), evidence on the non-descendants of concept), by pgmpy."""
    import networkx as nx
    de = nx.descendants(model, concept)
    nd = {k: v for k, v in evidence.items() if k != concept and k not in de and k != outcome}
    q = VariableElimination(model.do([concept])).query([outcome], evidence={concept: state, **nd},
                                                        show_progress=False)
    return q.values
