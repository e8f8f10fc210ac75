"""In the LC_PIPE lane each technique's stats go to the node that applied it, not to the sampler."""

from livecache.nodes import diffusers_nodes
from livecache.nodes.diffusers_nodes import ApplyDeepCache, DiffusersSampler, LoadDiffusersModel
from livecache.nodes.streamlined_nodes import ApplyStepRehash


def test_stats_name_the_node_that_applied_each_technique(monkeypatch):
    sent = []
    monkeypatch.setattr(diffusers_nodes, "send_stats", lambda node, text, data: sent.append((node, text)))
    (model,) = LoadDiffusersModel().load("embedded:digits")
    (cached,) = ApplyDeepCache().apply(model, 2, 0, "uniform", 0.0, 1.0, unique_id="2")
    (both,) = ApplyStepRehash().apply(cached, 0.01, 1, "reuse", unique_id="7")
    assert model.applied_by == () and cached.applied_by == ("2",)  # inputs are never changed
    DiffusersSampler().sample(both, "3", "", 0, 3, 2.0, "ddim", 1, unique_id="3")
    assert [node for node, _ in sent] == ["2", "7"] and sent[0][1].startswith("DeepCache:")
    sent.clear()
    untracked = type(model)(**{**vars(model), "accelerations": cached.accelerations, "applied_by": ()})
    DiffusersSampler().sample(untracked, "3", "", 0, 3, 2.0, "ddim", 1, unique_id="3")
    assert [node for node, _ in sent] == ["3"]  # a technique nobody claims reports on the sampler
