"""writers=...: validated at construction (the deprecated FullModel(writers=...) still works); file i of the layout
goes to rank i mod world_size. The 2-process byte parity is tests/distributed/test_parallel_writers_parity.py."""

import pytest

from open_instruct_ckpt import CheckpointCallback, FullModel
from open_instruct_ckpt._write.layout import pretrained_weights
from open_instruct_ckpt._write.shards import files_of_rank


def test_writers_must_be_main_or_all():
    with pytest.raises(ValueError, match=r"writers='every': use 'main' .* or 'all' .*shared by all ranks"):
        CheckpointCallback(FullModel(), writers="every")
    assert CheckpointCallback(FullModel(), writers="all").writers == "all"
    assert CheckpointCallback(FullModel()).writers == "main"


def test_the_old_spelling_on_full_model_still_works_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match=r"FullModel\(writers='all'\) is deprecated: pass CheckpointCallback\(\.\.\., "
                                                r"writers='all'\)"):
        strategy = FullModel(writers="all")
    assert CheckpointCallback(strategy).writers == "all"
    assert repr(strategy) == repr(FullModel())  # how it is written is not in the manifest
    with pytest.raises(ValueError, match=r"FullModel\(writers='main'\) and CheckpointCallback\(writers='all'\) "
                                         r"disagree; pass only CheckpointCallback\(writers=\.\.\.\)"):
        CheckpointCallback(FullModel(writers="main"), writers="all")


def test_each_file_has_exactly_one_writer(llama):
    layout = pretrained_weights(llama, 20_000).layout
    files = list(layout.files)
    shares = [files_of_rank(layout, rank, 3) for rank in range(3)]
    assert len(files) > 3 and set().union(*shares) == set(files) and sum(map(len, shares)) == len(files)
    assert shares[1] == {files[1], files[4]} | ({files[7]} if len(files) > 7 else set())
