"""Patient-level, stratified, seeded splitting with duplicate groups kept together.

The unit of splitting is a *group*: all images of one patient, joined with every image that is an exact or
near duplicate of one of them (union-find). A group never straddles two splits, so neither a patient nor a
re-uploaded copy of an image can leak from training into validation or test.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
from scipy.cluster.hierarchy import DisjointSet

_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def near_duplicate_pairs(hashes: Sequence[bytes], max_distance: int) -> list[tuple[int, int, int]]:
    """All pairs (i, j, distance) with i < j whose perceptual hashes differ in at most ``max_distance`` bits."""
    if len(hashes) < 2 or max_distance < 0:
        return []
    bits = np.frombuffer(b"".join(hashes), dtype=np.uint8).reshape(len(hashes), -1)
    pairs: list[tuple[int, int, int]] = []
    chunk = 256
    for start in range(0, len(hashes), chunk):
        block = bits[start : start + chunk]
        dist = _POPCOUNT[block[:, None, :] ^ bits[None, :, :]].sum(axis=2, dtype=np.int32)
        rows, cols = np.nonzero(dist <= max_distance)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            i = start + r
            if i < c:
                pairs.append((i, c, int(dist[r, c])))
    return pairs


def group_ids(patient_ids: Sequence[str], links: Sequence[tuple[int, int]]) -> list[int]:
    """Group index per image: same patient or linked (duplicate) images share a group, named by its smallest
    image index (so the ids do not depend on the order of the links). Disjoint sets are scipy's."""
    sets = DisjointSet(range(len(patient_ids)))
    first: dict[str, int] = {}
    for i, pid in enumerate(patient_ids):
        sets.merge(first.setdefault(pid, i), i)
    for a, b in links:
        sets.merge(a, b)
    group = [0] * len(patient_ids)
    for members in sets.subsets():
        root = min(members)
        for i in members:
            group[i] = root
    return group


def _shuffled_groups(members: dict[int, list[int]], keys: Sequence[str], rng: np.random.Generator) -> list[int]:
    """Group ids in a seeded random order that depends only on the images' stable keys, not on input order."""
    ordered = sorted(members, key=lambda g: min(keys[i] for i in members[g]))
    return [ordered[i] for i in rng.permutation(len(ordered))]


def cap_groups(
    labels: Sequence[str], groups: Sequence[int], keys: Sequence[str], caps: dict[str, int], seed: int
) -> list[bool]:
    """Keep at most ``caps[label]`` images of a class, choosing whole groups in a seeded order."""
    keep = [True] * len(labels)
    for label, cap in sorted(caps.items()):
        members: dict[int, list[int]] = defaultdict(list)
        for i, (lab, g) in enumerate(zip(labels, groups, strict=True)):
            if lab == label:
                members[g].append(i)
        rng = np.random.default_rng([seed, 7])
        total = 0
        for g in _shuffled_groups(members, keys, rng):
            size = len(members[g])
            if total + size > cap:
                for i in members[g]:
                    keep[i] = False
                continue
            total += size
    return keep


SPLIT_STRICTNESS: tuple[str, ...] = ("test", "val", "train")
"""Pre-decided splits, strictest first: a group with images fixed to several splits goes whole to the first."""


def _majority_label(labels: Sequence[str], members: Sequence[int]) -> str:
    """The most frequent label among ``members``; a tie goes to the label first in sorted order."""
    counts: dict[str, int] = defaultdict(int)
    for i in members:
        counts[labels[i]] += 1
    return min(counts, key=lambda lab: (-counts[lab], lab))


def assign_splits(
    labels: Sequence[str],
    groups: Sequence[int],
    keys: Sequence[str],
    *,
    fractions: dict[str, float],
    seed: int,
    fixed: Sequence[str | None] | None = None,
) -> list[str]:
    """Split name per image, whole groups at a time, stratified by label: a group never straddles two splits.

    ``fractions`` maps split names to image shares, filled in the given order (e.g. test then val, the rest
    to train), separately for each label. A group whose images carry both labels (one patient with a normal
    and a covid film) is placed with the groups of its majority label (a tie: the label first in sorted order)
    and counted there with all its images.

    ``fixed`` gives images whose split is already decided (a pre-split import; ``None`` for the others; names
    from :data:`SPLIT_STRICTNESS`). A group with a decided image goes whole to that split; when its images are
    decided differently (a patient in both the test and the train folder of the import) the whole group goes
    to the strictest of them, test before val before train, so nothing of a test patient is trained or
    selected on. The fractions apply to the groups without any decided image.
    """
    n = len(labels)
    fixed = list(fixed) if fixed is not None else [None] * n
    if len(groups) != n or len(keys) != n or len(fixed) != n:
        raise ValueError(f"labels, groups, keys and fixed must have one entry per image ({n}).")
    unknown = sorted({f for f in fixed if f is not None} - set(SPLIT_STRICTNESS))
    if unknown:
        raise ValueError(f"unknown fixed split(s) {unknown}; use one of {list(SPLIT_STRICTNESS)} or None.")
    members: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        members[groups[i]].append(i)
    result: list[str] = ["train"] * n
    free: dict[str, dict[int, list[int]]] = defaultdict(dict)
    for g, idx in members.items():
        decided = {fixed[i] for i in idx if fixed[i] is not None}
        if decided:
            name = min(decided, key=SPLIT_STRICTNESS.index)
            for i in idx:
                result[i] = name
        else:
            free[_majority_label(labels, idx)][g] = idx
    for label in sorted(set(labels)):
        stratum = free.get(label, {})
        total = sum(len(m) for m in stratum.values())
        rng = np.random.default_rng([seed, sum(map(ord, label))])
        order = _shuffled_groups(stratum, keys, rng)
        targets = []
        cumulative = 0.0
        for name, frac in fractions.items():
            cumulative += frac
            targets.append((name, cumulative * total))
        filled = 0
        for g in order:
            size = len(stratum[g])
            name = "train"
            for split_name, bound in targets:
                if filled + size / 2 <= bound:
                    name = split_name
                    break
            filled += size
            for i in stratum[g]:
                result[i] = name
    return result
