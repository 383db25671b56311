"""The study's worker processes: the local pool (--workers 2 on CPU) and one run under torchrun
on two CPU ranks (gloo), the way a Ray task runs a run on several GPUs: rank 0 alone writes the
run's records, every rank trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from physlm_graph._study import StudySpec, load_study
from physlm_graph.runtime.study import Execution, StudyRuns, prepare, run_study

from ._study_fixtures import DATA, ROOT, tiny_study

pytestmark = [pytest.mark.skipif(not DATA.is_file(), reason="needs ../shared/data/tinyshakespeare"), pytest.mark.slow]


def test_local_pool_of_two_cpu_workers(tmp_path):  # a Python process per run: about 10 s each
    study = tiny_study(tmp_path, variants=[{"name": "a"}, {"name": "b", "set": {"params.dim": 24}}], seeds=[0],
                       steps=4, train={"eval_every": 2})
    res = run_study(study, out=tmp_path / "out", progress=False, execution=Execution(device="cpu", workers=2))
    assert res["ran"] == 2 and res["missing"] == []
    assert sorted(p.name for p in (tmp_path / "out" / "logs").iterdir()) == ["a-seed0.log", "b-seed0.log"]
    for name in ("a", "b"):
        done = json.loads((tmp_path / "out" / "runs" / name / "seed0" / "done.json").read_text(encoding="utf-8"))
        assert done["steps"] == 4 and done["device"] == "cpu"


def test_one_run_under_torchrun_on_two_cpu_ranks(tmp_path):
    study = tiny_study(tmp_path, variants=[{"name": "a"}], seeds=[0], steps=4, train={"eval_every": 2})
    spec, root = load_study(study)
    runs = StudyRuns(StudySpec(spec, root, study), tmp_path / "out")
    assert prepare(runs, "a", 0) == "new"  # the launcher prepares the folder (study_ray.run_task)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        "-m", "physlm_graph.runtime.study", str(study), "--out", str(tmp_path / "out"),
                        "--variant", "a", "--seed", "0", "--device", "cpu"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    folder = runs.run_dir("a", 0)
    done = json.loads((folder / "done.json").read_text(encoding="utf-8"))
    assert done["steps"] == 4 and done["tokens"] == 4 * 4 * 16 * 2  # two ranks of batch 4 x seq 16
    assert [c[0] for c in done["curve"]] == [2, 4]
    assert json.loads((folder / "run.json").read_text(encoding="utf-8"))["resumes"] == []
