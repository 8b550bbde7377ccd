"""From head outputs to detections: mask scores, the queries eval runs the head on, one head
pass per query."""

import torch

from mfcache.config import HeadConfig
from mfcache.heads import build_head
from mfcache.stages.postprocess import first_detections, kept_queries, mask_probs, mask_scores, once_per_query
from tests.helpers.heads import as_batch, head_inputs


def test_mask_prob_scoring():
    prob = torch.tensor([[[0.9, 0.7], [0.2, 0.1]], [[0.3, 0.2], [0.1, 0.0]]])
    scores = mask_scores(torch.tensor([1.0, 0.5]), prob, "mask_prob")
    torch.testing.assert_close(scores, torch.tensor([0.8, 0.0]))
    torch.testing.assert_close(mask_scores(torch.tensor([1.0, 0.5]), prob, "class"), torch.tensor([1.0, 0.5]))


def test_eval_runs_the_head_only_on_kept_queries():
    labels = torch.tensor([[0, 2, 1, 2, 0, 1], [2, 2, 0, 1, 1, 0]])
    to_category = torch.tensor([5, 7, -1])  # label 2 maps to no dataset category
    kept = kept_queries(labels, to_category, max_detections=2)
    assert kept.tolist() == [[True, False, True, False, False, False], [False, False, True, True, False, False]]

    x = head_inputs()
    head = build_head(HeadConfig(roi_size=16), d_model=16, c1_channels=8, num_levels=4).eval()
    full, _ = mask_probs(head, as_batch(x, torch.arange(6).expand(2, 6)))
    some, _ = mask_probs(head, as_batch(x, torch.arange(6).expand(2, 6)), kept)
    torch.testing.assert_close(some[kept], full[kept])
    assert (some[~kept] == 0).all()


def test_each_query_runs_once_and_its_other_labels_share_its_mask():
    # top-k over queries x classes: query 7 listed 3 times, query 2 twice
    query_index = torch.tensor([[7, 2, 7, 5, 2, 7], [0, 1, 2, 3, 4, 5]])
    select = torch.tensor([[True, True, True, True, True, True], [True, False, True, True, False, True]])
    assert first_detections(query_index, select)[0].tolist() == [0, 1, 0, 3, 1, 0]
    assert once_per_query(query_index, select).tolist() == [
        [True, True, False, True, False, False],
        [True, False, True, True, False, True],
    ]
    later = select.clone()
    later[0, 0] = False  # query 7's first selected detection is then position 2
    assert once_per_query(query_index, later)[0].tolist() == [False, True, True, True, False, False]

    x = head_inputs()
    for row, source in enumerate(query_index[0].tolist()):  # duplicates carry their query's embedding and box
        first = query_index[0].tolist().index(source)
        x["queries"][0, row], x["boxes"][0, row] = x["queries"][0, first], x["boxes"][0, first]
    config = HeadConfig(roi_size=16, query_encoder=("self_attn", "box_cross_attn", "ffn"), scoring="mask_iou")
    head = build_head(config, d_model=16, c1_channels=8, num_levels=4).eval()
    with torch.no_grad():
        direct = head(x["queries"], x["boxes"], x["levels"], x["c1"])  # every detection, duplicates included
        prob, quality = mask_probs(head, as_batch(x, query_index))
    torch.testing.assert_close(prob.flatten(0, 1), direct.mask_logits.sigmoid()[:, 0])
    torch.testing.assert_close(quality.flatten(), direct.quality.reshape(-1))
