"""`hfllm push`: the staged folder (what `--dry_run` writes is exactly what is uploaded) loads with `from_pretrained`,
its model card parses with huggingface_hub and carries the run's facts, and the upload goes through the real Hub
client with only the network faked (an httpx transport that records requests). The token never reaches a file or
the output."""

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import ModelCard, constants
from huggingface_hub.utils import close_session, set_client_factory
from huggingface_hub.utils._http import default_client_factory

from hfllm.cli import main
from hfllm.errors import HfllmError
from hfllm.shipping import push
from helpers import TINY, data_args, log_history

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_" + "SecretTestToken" * 2


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real 4-step pretraining run (tiny recipe at test size) with evaluations and checkpoints."""
    folder = tmp_path_factory.mktemp("push-run")
    out = folder / "run"
    code = main(["pretrain", str(ROOT / "recipes/tiny.yaml"), *TINY, *data_args(folder), "--max_steps", "4",
                 "--eval_steps", "2", "--save_steps", "2", "--logging_steps", "1", "--output_dir", str(out)])
    assert code == 0
    return out


def staged(run: Path, tmp_path: Path, repo_id: str = "me/tiny-shakespeare", *extra: str) -> Path:
    out = tmp_path / "staged"
    assert main(["push", str(run), repo_id, "--dry_run", str(out), *extra]) == 0
    return out


def test_dry_run_stages_model_code_tokenizer_and_a_card_with_the_runs_facts(run_dir, tmp_path):
    out = staged(run_dir, tmp_path, "me/tiny-shakespeare", "--format", "hfllm")
    names = {path.name for path in out.iterdir()}
    assert {"README.md", "config.json", "model.safetensors", "modeling_hfllm.py", "configuration_hfllm.py",
            "generation_config.json", "tokenizer.json", "tokenizer_config.json", "recipe.yaml", "run_info.json",
            "loss_curve.png"} <= names
    assert not any(name.startswith(("checkpoint-", "runs", "training_args", "optimizer")) for name in names)

    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["pipeline_tag"] == "text-generation"
    assert data["library_name"] == "transformers" and {"hfllm", "pretraining"} <= set(data["tags"])
    last_eval = [entry for entry in log_history(run_dir / "checkpoint-4") if "eval_loss" in entry][-1]["eval_loss"]
    [result] = data["model-index"][0]["results"]
    loss = {metric["type"]: metric["value"] for metric in result["metrics"]}["loss"]
    assert loss == pytest.approx(last_eval, abs=1e-4)

    run_info = json.loads((run_dir / "run_info.json").read_text())
    weights_sha = hashlib.sha256((run_dir / "model.safetensors").read_bytes()).hexdigest()
    for fact in (run_info["git"]["commit"], run_info["data_sha256"]["train"], run_info["tokenizer_sha256"], weights_sha,
                 "![loss curve](loss_curve.png)", 'from_pretrained("me/tiny-shakespeare", trust_remote_code=True)',
                 "learning_rate: 0.003", "Published with hfllm's own model code (`--format hfllm`)"):
        assert str(fact) in card.text, fact


LOAD_WITHOUT_HFLLM = """
import sys, json, torch
sys.modules["hfllm"] = None  # only the code in the folder can be used
from transformers import AutoModelForCausalLM, AutoTokenizer
remote = sys.argv[2] == "remote"
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=remote).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=remote)
ids = tokenizer("ROMEO:\\n", return_tensors="pt").input_ids
print(json.dumps({"module": type(model).__module__, "logits": model(ids).logits[0, -1, :8].tolist()}))
"""


def _load_elsewhere(folder: Path, mode: str, tmp_path: Path) -> dict:
    env = {"HF_HUB_OFFLINE": "1", "PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_WITHOUT_HFLLM), str(folder), mode],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _logits(folder: Path) -> list[float]:
    from hfllm.checkpoint import load

    model, tokenizer = load(folder)
    with torch.no_grad():
        return model(tokenizer("ROMEO:\n", return_tensors="pt").input_ids).logits[0, -1, :8].tolist()


def test_staged_folder_loads_with_its_own_code_where_hfllm_is_not_installed(run_dir, tmp_path):
    loaded = _load_elsewhere(staged(run_dir, tmp_path, "me/tiny-shakespeare", "--format", "hfllm"), "remote", tmp_path)
    assert loaded["module"].startswith("transformers_modules")
    assert loaded["logits"] == pytest.approx(_logits(run_dir), abs=1e-5)


def test_auto_publishes_the_exact_native_class_that_loads_without_hfllm_or_remote_code(run_dir, tmp_path):
    out = staged(run_dir, tmp_path)  # --format auto
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and not list(out.glob("*.py"))
    card = ModelCard.load(out / "README.md")
    assert "Published as the native transformers class `LlamaForCausalLM` (`--format auto`)" in card.text
    assert "bit for bit" in card.text and "trust_remote_code=True" not in card.text
    assert hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest() in card.text  # the staged weights
    loaded = _load_elsewhere(out, "native", tmp_path)
    assert loaded["module"] == "transformers.models.llama.modeling_llama"
    assert loaded["logits"] == _logits(run_dir)  # identical, not close


@pytest.fixture(scope="module")
def unmappable_dir(run_dir, tmp_path_factory):
    """An hfllm checkpoint no native class computes (a bias on the attention output projection alone), with the
    run's tokenizer."""
    from hfllm import HfllmForCausalLM
    from hfllm.checkpoint import load

    folder = tmp_path_factory.mktemp("unmappable") / "model"
    model, tokenizer = load(run_dir)
    torch.manual_seed(0)
    HfllmForCausalLM(model.config.__class__(**{**model.config.to_dict(), "attention_out_bias": True})).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_auto_publishes_hfllm_code_with_the_reason_when_no_native_class_is_exact(unmappable_dir, tmp_path, capsys):
    out = staged(unmappable_dir, tmp_path)
    assert json.loads((out / "config.json").read_text())["model_type"] == "hfllm"
    assert (out / "modeling_hfllm.py").is_file()
    card = ModelCard.load(out / "README.md")
    assert "Published with hfllm's own model code" in card.text
    assert "a bias on the output projection alone exists in no native architecture" in card.text
    assert 'trust_remote_code=True' in card.text

    capsys.readouterr()
    assert main(["push", str(unmappable_dir), "me/x", "--format", "native", "--dry_run", str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format native: no native transformers architecture matches this model: a " \
        "bias on the output projection alone" in err, err
    assert not (tmp_path / "n").exists()


def _corrupting(stage, edit):
    """`push.stage`, then `edit(out)` on the staged folder: a broken artifact."""
    def corrupt(run_dir, repo_id, out, license_id, fmt="auto"):
        names = stage(run_dir, repo_id, out, license_id, fmt)
        edit(out)
        return names
    return corrupt


def _alter_template(out: Path) -> None:
    config = json.loads((out / "tokenizer_config.json").read_text())
    if "chat_template" in config:
        config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
        (out / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        template = out / "chat_template.jinja"
        template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))


def _swap_eos(out: Path) -> None:
    config = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": 7}))


@pytest.mark.parametrize("edit, fmt, message", [
    (_alter_template, "auto", r"the staged folder \(tokenizer.json, tokenizer_config.json(, chat_template.jinja)?\) does not "
                      r"reproduce the source model: chat 1's rendered prompt differs at token 2: the staged model has "
                      r"' ' \(id \d+\), the source 'u' \(id \d+\); nothing was pushed"),
    (_swap_eos, "hfllm", r"the staged folder \(generation_config.json\) does not reproduce the source model: the staged model "
                r"ends a sequence at token ids \[7\], the source at \[\d+\]"),
])
def test_a_staged_folder_that_answers_differently_stops_the_push(run_dir, tmp_path, monkeypatch, capsys, fake_hub,
                                                                  edit, fmt, message):
    monkeypatch.setattr(push, "stage", _corrupting(push.stage, edit))
    out = tmp_path / "out"
    assert main(["push", str(run_dir), "me/x", "--format", fmt, "--dry_run", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing half-written
    assert main(["push", str(run_dir), "me/x", "--format", fmt]) == 2  # and nothing uploaded
    assert fake_hub.commits == [] and re.search(message, capsys.readouterr().err)


def test_native_export_stages_without_remote_code(run_dir, tmp_path):
    native = tmp_path / "native"
    assert main(["export", str(run_dir), str(native), "--to", "transformers"]) == 0
    out = staged(native, tmp_path)
    assert not list(out.glob("*.py"))
    card = ModelCard.load(out / "README.md")
    assert "trust_remote_code" not in card.text
    loaded = _load_elsewhere(out, "native", tmp_path)
    assert loaded["module"] == "transformers.models.llama.modeling_llama"
    assert loaded["logits"] == pytest.approx(_logits(run_dir), abs=1e-5)


@pytest.fixture
def adapter_dir(tiny_llama_chat_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_chat_dir)
    adapter = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_llama_chat_dir).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_card_names_its_base_model_and_the_staged_adapter_loads(adapter_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM

    out = staged(adapter_dir, tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= {p.name for p in out.iterdir()}
    assert ModelCard.load(out / "README.md").data.to_dict()["library_name"] == "peft"
    loaded = AutoPeftModelForCausalLM.from_pretrained(out)
    assert any("lora_A" in name for name, _ in loaded.named_parameters())

    config = json.loads((adapter_dir / "adapter_config.json").read_text())  # a base model that lives on the Hub
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    card = ModelCard.load(staged(adapter_dir, tmp_path / "hub-base") / "README.md")
    assert card.data.to_dict()["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "peft" in card.data.to_dict()["tags"]


# ----------------------------------------------------------------------------- the upload, network faked


class FakeHub:
    """The Hub's HTTP API as far as create_repo / create_branch / upload_folder use it; records what arrives."""

    def __init__(self, refuse: int | None = None):
        self.refuse = refuse
        self.requests: list[tuple[str, str]] = []
        self.created: dict | None = None
        self.branches: list[str] = []
        self.commits: list[tuple[str, dict[str, bytes]]] = []  # (revision, path -> content)
        self.authorization: set[str] = set()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        self.authorization.add(request.headers.get("authorization", ""))
        if self.refuse:
            return httpx2.Response(self.refuse, json={"error": "refused"})
        if path == "/api/repos/create":
            self.created = json.loads(request.content)
            repo_id = "/".join(filter(None, (self.created.get("organization"), self.created["name"])))
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo_id}"})
        if path == "/api/validate-yaml":  # upload_folder has the Hub check a README's metadata
            return httpx2.Response(200, json={})
        if "/branch/" in path:
            self.branches.append(path.rsplit("/", 1)[-1])
            return httpx2.Response(200, json={})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line.strip()]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}
            self.commits.append((path.rsplit("/", 1)[-1], files))
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/me/tiny/commit/" + "a" * 40,
                                              "commitOid": "a" * 40})
        return httpx2.Response(404, json={"error": f"not faked: {path}"})


@pytest.fixture
def fake_hub(monkeypatch):
    """Install a FakeHub as huggingface_hub's HTTP transport; a token in the environment, online mode."""
    hub = FakeHub()
    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield hub
    set_client_factory(default_client_factory)
    close_session()


def test_push_uploads_exactly_the_dry_run_folder_to_the_repo_and_revision(run_dir, tmp_path, fake_hub, capsys, caplog):
    expected = staged(run_dir, tmp_path)
    assert main(["push", str(run_dir), "me/tiny-shakespeare", "--private", "--revision", "exp"]) == 0
    created = fake_hub.created
    assert (created["organization"], created["name"]) == ("me", "tiny-shakespeare")
    assert created.get("private") is True or created.get("visibility") == "private", created
    assert fake_hub.branches == ["exp"]
    [(revision, files)] = fake_hub.commits
    assert revision == "exp"
    assert set(files) == {path.name for path in expected.iterdir()}
    for name, content in files.items():
        if name != "loss_curve.png":  # re-rendered: PNG metadata may differ
            assert content == (expected / name).read_bytes(), name
    assert f"Bearer {TOKEN}" in fake_hub.authorization  # the token went to the Hub client ...
    output = capsys.readouterr()
    assert TOKEN not in output.out + output.err + caplog.text  # ... and nowhere else
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or TOKEN.encode() not in path.read_bytes(), path
    assert all(TOKEN.encode() not in content for content in files.values())


def test_a_token_inside_the_run_folder_stops_the_upload(run_dir, tmp_path, fake_hub):
    run = shutil.copytree(run_dir, tmp_path / "run")
    (run / "samples.txt").write_text(f"oops {TOKEN}\n")
    with pytest.raises(HfllmError, match="token is written in .*samples.txt"):
        push.main([str(run), "me/tiny"])
    assert fake_hub.commits == []


@pytest.mark.parametrize("status, hint", [(401, "hf auth login"), (403, "write token")])
def test_hub_refusal_is_one_line(run_dir, fake_hub, status, hint):
    fake_hub.refuse = status
    with pytest.raises(HfllmError, match=f"HTTP {status}.*{hint}"):
        push.main([str(run_dir), "me/tiny"])


def with_gguf(model_dir: Path, tmp_path: Path, quant: str = "f16", edit_template=None) -> Path:
    """A copy of a model folder (tiny_chat_dir: a ChatML BPE that GGUF can hold) with its `hfllm export --to gguf`
    file and Modelfile beside the weights; `edit_template` alters the chat template that goes into the GGUF only."""
    run = shutil.copytree(model_dir, tmp_path / "run", ignore=shutil.ignore_patterns("checkpoint-*"))
    source = run
    if edit_template is not None:
        source = shutil.copytree(run, tmp_path / "altered")
        edit_template(source)
    assert main(["export", str(source), str(tmp_path / "gguf"), "--to", "gguf", "--quant", quant]) == 0
    for path in (tmp_path / "gguf").iterdir():
        shutil.copy2(path, run / path.name)
    return run


def test_gguf_files_and_modelfile_go_up_and_are_named_in_the_card(tiny_chat_dir, tmp_path, monkeypatch, capsys):
    run = with_gguf(tiny_chat_dir, tmp_path, "q8_0")
    monkeypatch.setenv("HFLLM_CACHE", str(tmp_path / "no-cache"))  # no llama.cpp wheel: that check is skipped
    capsys.readouterr()
    out = staged(run, tmp_path)
    assert {"run.Q8_0.gguf", "Modelfile"} <= {p.name for p in out.iterdir()}
    card = ModelCard.load(out / "README.md")
    assert "gguf" in card.data.to_dict()["tags"] and "llama-cli -m run.Q8_0.gguf" in card.text
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [f"note: GGUF check skipped for run.Q8_0.gguf: llama.cpp is not built here (no llama-cpp-python"
                     f"==0.3.36 wheel in {tmp_path / 'no-cache' / 'wheels'}); its build command is in docs/push.md"]

    (run / "run.Q8_0.gguf").write_bytes(b"GGUF" + bytes(60))  # every GGUF's header is read, llama.cpp or not
    with pytest.raises(HfllmError, match="run.Q8_0.gguf' is truncated or corrupt"):
        push.main([str(run), "me/x", "--dry_run", str(tmp_path / "broken")])
    assert not (tmp_path / "broken").exists()


@pytest.fixture
def cached_llama_cpp():
    """llama-cpp-python from hfllm's cached wheel; skipped where it is not built (building it takes minutes; the
    test without it asserts the 'skipped' notice instead)."""
    from hfllm.assets import llama_cpp

    try:
        return llama_cpp(build=False)
    except HfllmError as error:
        pytest.skip(f"the GGUF check needs llama.cpp, which is not built here: {error}")


def test_llama_cpp_passes_a_faithful_gguf_and_refuses_one_with_an_altered_template(tiny_chat_dir, tmp_path, capsys,
                                                                                   cached_llama_cpp):
    run = with_gguf(tiny_chat_dir, tmp_path / "good", "f16")
    capsys.readouterr()
    out = staged(run, tmp_path / "good")
    assert "run.F16.gguf" in {p.name for p in out.iterdir()} and "note:" not in capsys.readouterr().err

    run = with_gguf(tiny_chat_dir, tmp_path / "bad", "f16", edit_template=_alter_template)
    capsys.readouterr()
    assert main(["push", str(run), "me/x", "--dry_run", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hfllm push: error: altered.F16.gguf does not answer as the "
                                                   "source model: chat 1's rendered prompt differs at token 1: llama.cpp "
                                                   "has 'Ġ' (id 223), the source 's' (id 85); nothing was pushed"), err
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    cases = [
        ([str(tmp_path / "missing"), "me/x"], "does not exist"),
        ([str(empty), "me/x"], "holds no weights"),
        ([str(run_dir), "not a repo"], "repo id 'not a repo' is not valid"),
        ([str(run_dir), "me/x", "--license", "gpl-9"], "invalid choice"),
        ([str(run_dir), "me/x", "--dry_run", str(run_dir)], "is not empty"),
    ]
    for argv, message in cases:
        with pytest.raises(HfllmError, match=message):
            push.main(argv)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HfllmError, match="HF_HUB_OFFLINE is set"):
        push.main([str(run_dir), "me/x"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored login either
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    with pytest.raises(HfllmError, match="no Hugging Face token"):
        push.main([str(run_dir), "me/x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "hf-home"] or sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
