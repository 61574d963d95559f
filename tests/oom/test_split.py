from __future__ import annotations

import dataclasses
from collections import OrderedDict, namedtuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_tiercache import BatchSplitError
from lightning_tiercache.oom.split import batch_size_of, chunk_sizes, merge_outputs, split_batch


@dataclasses.dataclass
class Sample:
    x: torch.Tensor
    names: list[str]
    tag: str = "t"


Pair = namedtuple("Pair", ["a", "b"])


def test_tensor_split_sizes_follow_tensor_split():
    parts = split_batch(torch.arange(10), 4)
    assert [len(p) for p in parts] == [3, 3, 2, 2] == chunk_sizes(10, 4)
    assert torch.equal(torch.cat(parts), torch.arange(10))


def test_more_micro_batches_than_samples_gives_one_sample_each():
    assert [len(p) for p in split_batch(torch.zeros(3, 2), 8)] == [1, 1, 1]


def test_nested_containers_split_field_by_field_and_keep_types():
    batch = {
        "x": torch.arange(6).view(6, 1),
        "pair": Pair(torch.arange(6), torch.ones(())),
        "ids": ["a", "b", "c", "d", "e", "f"],
        "meta": (torch.arange(6) * 2, 7, None),
        "od": OrderedDict(z=torch.arange(6)),
    }
    parts = split_batch(batch, 2)
    assert len(parts) == 2
    p = parts[1]
    assert torch.equal(p["x"].view(-1), torch.tensor([3, 4, 5]))
    assert isinstance(p["pair"], Pair) and torch.equal(p["pair"].a, torch.tensor([3, 4, 5]))
    assert p["pair"].b.ndim == 0  # 0-dim tensors are copied to every micro-batch
    assert p["ids"] == ["d", "e", "f"]
    assert p["meta"][1:] == (7, None) and torch.equal(p["meta"][0], torch.tensor([6, 8, 10]))
    assert isinstance(p["od"], OrderedDict)


def test_dataclass_batches_split_into_the_same_dataclass():
    parts = split_batch(Sample(torch.arange(4), ["a", "b", "c", "d"]), 2)
    assert all(type(p) is Sample for p in parts)
    assert parts[1].names == ["c", "d"] and parts[1].tag == "t"
    assert torch.equal(parts[1].x, torch.tensor([2, 3]))


def test_hf_batch_encoding_splits_into_batch_encodings():
    transformers = pytest.importorskip("transformers")
    enc = transformers.BatchEncoding({"input_ids": torch.arange(12).view(4, 3), "attention_mask": torch.ones(4, 3)})
    parts = split_batch(enc, 2)
    assert all(isinstance(p, transformers.BatchEncoding) for p in parts)
    assert torch.equal(parts[1]["input_ids"], torch.arange(6, 12).view(2, 3))
    assert parts[1].input_ids.shape == (2, 3)  # attribute access still works


def test_tensors_with_a_different_leading_size_are_an_error():
    with pytest.raises(BatchSplitError, match=r"batch\['mask'\] has leading size 3 but the batch size is 4"):
        split_batch({"x": torch.zeros(4, 2), "mask": torch.zeros(3)}, 2)


def test_unknown_types_ask_for_a_split_function():
    class Opaque:
        pass

    with pytest.raises(BatchSplitError, match=r"cannot split batch\[1\] of type .*Opaque.*split_batch\(self, batch"):
        split_batch((torch.zeros(4), Opaque()), 2)


def test_batches_without_tensors_are_an_error():
    with pytest.raises(BatchSplitError, match="cannot find the batch size of a dict"):
        split_batch({"a": 1}, 2)


def test_user_split_fn_is_used_and_checked():
    parts = split_batch("abcd", 2, split_fn=lambda b, n: [b[:2], b[2:]])
    assert parts == ["ab", "cd"]
    with pytest.raises(BatchSplitError, match=r"split_fn returned 3 micro-batches for n=2"):
        split_batch("abc", 2, split_fn=lambda b, n: list(b))


def test_batch_size_of_finds_the_first_batched_tensor_or_sample_list():
    assert batch_size_of({"s": torch.tensor(1.0), "x": torch.zeros(5, 2)}) == 5
    assert batch_size_of(["a", "b"]) == 2
    assert batch_size_of({"a": 1}) is None


def test_merge_concatenates_batched_and_weights_scalars():
    outs = [{"y": torch.ones(3, 2), "loss": torch.tensor(1.0), "n": 3, "ids": ["a", "b", "c"]}]
    outs.append({"y": torch.zeros(1, 2), "loss": torch.tensor(5.0), "n": 1, "ids": ["d"]})
    merged = merge_outputs(outs, [3, 1])
    assert merged["y"].shape == (4, 2)
    assert merged["loss"].item() == pytest.approx(2.0)  # (1*3 + 5*1) / 4
    assert merged["n"] == 4 and merged["ids"] == ["a", "b", "c", "d"]
    assert merge_outputs([None, None], [2, 2]) is None


def test_merge_refuses_mismatched_outputs():
    with pytest.raises(BatchSplitError, match=r"output changes type between micro-batches"):
        merge_outputs([torch.ones(2), None], [2, 2])
    with pytest.raises(BatchSplitError, match=r"cannot merge output: shapes"):
        merge_outputs([torch.ones(5, 2), torch.ones(7)], [2, 2])


@settings(max_examples=40, deadline=None)
@given(total=st.integers(1, 40), n=st.integers(1, 12), width=st.integers(1, 3))
def test_split_then_merge_is_the_identity(total, n, width):
    batch = {"x": torch.randn(total, width), "ids": [str(i) for i in range(total)]}
    parts = split_batch(batch, n)
    assert len(parts) == min(n, total)
    sizes = [batch_size_of(p) for p in parts]
    merged = merge_outputs(parts, sizes)
    assert torch.equal(merged["x"], batch["x"]) and merged["ids"] == batch["ids"]
