"""Evaluation: the dataset's judges (an attribute classifier and a domain CLIP model, trained on
real images) and the metrics of generated images (``fid_domain``, ``kid_domain``,
``precision_domain``, ``recall_domain``, ``clip_domain``, ``fid``, ``clip_score``, ``align_*``,
``blank_rate``, ``fragment_rate``)."""
from __future__ import annotations

from ablate.eval.judge import Judge, get_judge, judge_key, train_judge
from ablate.eval.clip_judge import DomainClip, get_clip_judge, train_clip_judge
from ablate.eval.standard import check_eval_spec, clip_score, inception_fid, standard_floors
from ablate.eval.metrics import (alignment, blank_mask, count_components,
                                 domain_metrics, evaluate_images, fid_domain, fragment_mask,
                                 judge_report, kid_domain, pixel_std, precision_recall)

__all__ = ["Judge", "get_judge", "judge_key", "train_judge", "alignment", "blank_mask", "check_eval_spec",
           "clip_score", "count_components", "domain_metrics", "evaluate_images", "fid_domain", "fragment_mask",
           "inception_fid", "judge_report", "kid_domain", "pixel_std", "precision_recall", "DomainClip",
           "get_clip_judge", "train_clip_judge", "standard_floors"]
