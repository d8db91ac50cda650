"""bench/device_session.sh: its variants must parse before device time is spent on them."""
import os
import re
import subprocess

import ab
import train_gpt as tg
from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "bench", "device_session.sh")


def stage(name: str) -> str:
    text = open(SCRIPT, encoding="utf-8").read()
    return re.search(rf"^{name}\)(.*?)\n\S", text, re.S | re.M).group(1)


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_lever_variants_are_eval_side_names():
    specs = re.findall(r"--variant ([^\s\"]+)", stage("levers"))
    names = [ab.parse_variant(s)[0] for s in specs]  # raises on a typo or a training-side name
    assert len(specs) >= 8 and len(set(names)) == len(names)


def test_proxy_stage_env_names_are_declared():
    for name in ("proxy", "smear", "base", "sweep"):
        body = stage(name).replace("$(( (n * 13081 + 5000) / 10000 ))", "654")
        pairs = re.findall(r"\b([A-Z][A-Z0-9_]+)=([^\s,\"]+)", body)
        env = {k: v for k, v in pairs if not v.startswith("$")}
        assert len(env) >= 2
        tg.load_config(env)  # raises for an undeclared or retired name


def test_chained_levers_read_the_checkpoint_proxy_writes():
    """The levers chained after proxy, base and sweep read the base run's checkpoint: the path proxy.py
    gives ARTIFACT_DIR."""
    text = open(SCRIPT, encoding="utf-8").read()
    checkpoint = re.search(r"levers (\S+final_model\.pt)", re.search(r"^chain_after\(\).*?^}", text, re.S | re.M).group(0)).group(1)
    proxy = open(os.path.join(REPO_ROOT, "bench", "proxy.py"), encoding="utf-8").read()
    assert 'run_id = f"{args.prefix}_{name}"' in proxy and '"ARTIFACT_DIR": f"/tmp/art_{run_id}"' in proxy
    assert checkpoint == "/tmp/art_$1_base/final_model.pt"  # $1: the prefix each stage passes
    for name in ("proxy", "base", "sweep"):
        body = stage(name)
        prefix = re.search(r'--prefix "([^"]+)"', body).group(1)
        assert f'chain_after "{prefix}"' in body and "--variant base:" in body


def run_stage(stubs: str, name: str, *args) -> subprocess.CompletedProcess:
    """One stage's body run as `script.sh NAME ARGS...`, after the shell functions in `stubs`."""
    script = f'{stubs}; set -- {name} {" ".join(args)}; {stage(name).rstrip().removesuffix(";;")}'
    return subprocess.run(["bash", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)


def run_levers(tmp_path, *args) -> str:
    """The levers stage's body with `detached` replaced by writing its command: the tools/ab.py call."""
    cmd = tmp_path / "cmd"
    run_stage(f'detached() {{ printf "%s" "${{*:2}}" > {cmd}; }}; sleep() {{ :; }}; tail() {{ :; }}',
              "levers", *args).check_returncode()
    return cmd.read_text()


def test_levers_score_an_artifact_with_eval_variants_only(tmp_path):
    on_artifact = run_levers(tmp_path, ".art/base500_base.ptz", "eval")
    assert "tools/ab.py --artifact .art/base500_base.ptz" in on_artifact and "--variant chunks:" in on_artifact
    assert "nolqer" not in run_levers(tmp_path, ".art/x.ptz")  # no quantization variants on an artifact
    on_checkpoint = run_levers(tmp_path, "/tmp/ck/final_model.pt")
    assert "--checkpoint /tmp/ck/final_model.pt" in on_checkpoint and "--variant nolqer:" in on_checkpoint


def test_collect_brings_back_the_base_runs_artifacts(tmp_path):
    text = open(SCRIPT, encoding="utf-8").read()
    collect = re.search(r"^collect\(\).*?^}", text, re.S | re.M).group(0)
    art = f"/tmp/art_ptest{os.getpid()}_base"
    os.makedirs(art, exist_ok=True)
    try:
        with open(f"{art}/final_model.ptz", "wb") as f:
            f.write(b"blob")
        subprocess.run(["bash", "-c", f"{collect}; collect"], check=True, cwd=tmp_path,
                       env={**os.environ, "OUT": str(tmp_path)})
        assert (tmp_path / f"ptest{os.getpid()}_base.ptz").read_bytes() == b"blob"
    finally:
        os.remove(f"{art}/final_model.ptz")
        os.rmdir(art)


def test_wait_on_a_fresh_machine_fails_at_once(tmp_path):
    """A poll that lands on a fresh machine (the last one went back with its job) must not spend its
    S seconds waiting for a job that is gone (it cost 590 s of device time once)."""
    waited = tmp_path / "waited"
    r = run_stage(f'cat() {{ return 1; }}; wait_for() {{ touch {waited}; }}; tail() {{ :; }}', "wait", "570")
    assert r.returncode == 3 and "fresh start" in r.stderr and not waited.exists()
