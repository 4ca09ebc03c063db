"""FullModel(writers=...): validated at construction; file i of the plan goes to rank i mod world_size.
The 2-process byte parity is tests/distributed/test_parallel_writers_parity.py."""

import pytest

from open_instruct_ckpt import FullModel
from open_instruct_ckpt._shards import files_of_rank, plan_shards


def test_writers_must_be_main_or_all():
    with pytest.raises(ValueError, match=r"FullModel\(writers='every'\): use 'main' .* or 'all' .*shared by all ranks"):
        FullModel(writers="every")
    assert FullModel(writers="all").writers == "all" and FullModel().writers == "main"
    assert repr(FullModel(writers="all")) == repr(FullModel())  # how it is written is not in the manifest


def test_each_file_has_exactly_one_writer(llama):
    plan = plan_shards(llama, 20_000)
    files = list(plan.filename_to_names)
    shares = [files_of_rank(plan, rank, 3) for rank in range(3)]
    assert len(files) > 3 and set().union(*shares) == set(files) and sum(map(len, shares)) == len(files)
    assert shares[1] == {files[1], files[4]} | ({files[7]} if len(files) > 7 else set())
