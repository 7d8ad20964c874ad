"""settings.py: every environment variable, flags winning over them, and bad values named."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from mlxrunner import settings
from mlxrunner.settings import Settings, SettingsError, resolve

MODEL = {"model": "all-minilm"}


def test_nothing_set_gives_the_defaults():
    got = resolve(MODEL, env={})
    assert got == Settings(model="all-minilm")
    assert (got.host, got.port, got.queue_depth, got.max_body_bytes, got.log_level) == \
        ("127.0.0.1", 0, 16, 64 << 20, logging.INFO)
    assert not got.skip_memory_check and not got.release_text_encoder
    assert got.memory_limit is None and got.denoise_queue_depth is None and got.models_dir is None
    assert not got.mlx_engine


def test_mlx_engine_is_a_switch():
    assert resolve({**MODEL, "mlx_engine": True}, env={}).mlx_engine


@pytest.mark.parametrize("env, field, value", [
    ({"MLXRUNNER_SKIP_MEMORY_CHECK": "1"}, "skip_memory_check", True),
    ({"MLXRUNNER_SKIP_MEMORY_CHECK": "false"}, "skip_memory_check", False),
    ({"MLXRUNNER_MEMORY_LIMIT": "16GB"}, "memory_limit", 16 << 30),
    ({"MLXRUNNER_MEMORY_LIMIT": '"512 MiB"'}, "memory_limit", 512 << 20),  # quoted, as Ollama's Var allows
    ({"MLXRUNNER_MEMORY_LIMIT": "1000"}, "memory_limit", 1000),
    ({"MLXRUNNER_RELEASE_TEXT_ENCODER": " Yes "}, "release_text_encoder", True),
    ({"MLXRUNNER_DENOISE_QUEUE_DEPTH": "0"}, "denoise_queue_depth", 0),
    ({"MLXRUNNER_DENOISE_QUEUE_DEPTH": "4"}, "denoise_queue_depth", 4),
    ({"MLXRUNNER_CPU_DTYPE": "Stored"}, "cpu_dtype", "stored"),
    ({"MLXRUNNER_LOW_MEMORY": "1"}, "low_memory", True),
    ({}, "low_memory", False),
    ({}, "cpu_dtype", "float32"),
    ({"OLLAMA_DEBUG": "1"}, "log_level", logging.DEBUG),
    ({"OLLAMA_DEBUG": "junk"}, "log_level", logging.INFO),  # Ollama ignores what it cannot parse
    ({"MLXRUNNER_MEMORY_LIMIT": ""}, "memory_limit", None),  # empty is unset
])
def test_each_environment_variable(env, field, value):
    assert getattr(resolve(MODEL, env=env), field) == value


@pytest.mark.parametrize("value, expected", [("mkl", "mkl"), (" OpenBLAS ", "openblas"), ("'reference'", "reference"),
                                             ("auto", "auto"), ("", "auto")])
def test_the_cpu_blas_choice(value, expected):
    assert settings.cpu_blas_requested({"MLXRUNNER_CPU_BLAS": value}) == expected
    assert settings.cpu_blas_requested({}) == "auto"


def test_flags_win_over_their_environment_variables():
    env = {"MLXRUNNER_DENOISE_QUEUE_DEPTH": "5", "OLLAMA_DEBUG": "1", "MLXRUNNER_SKIP_MEMORY_CHECK": "0",
           "MLXRUNNER_RELEASE_TEXT_ENCODER": "no"}
    flags = {**MODEL, "denoise_queue_depth": "3", "log_level": "error", "skip_memory_check": True,
             "release_text_encoder": True}
    got = resolve(flags, env=env)
    assert (got.denoise_queue_depth, got.log_level, got.skip_memory_check, got.release_text_encoder) == \
        (3, logging.ERROR, True, True)
    # A switch not given leaves its variable in charge.
    assert resolve({**MODEL, "skip_memory_check": None}, env={"MLXRUNNER_SKIP_MEMORY_CHECK": "1"}).skip_memory_check


def test_cpu_dtype_flag_wins_and_a_bad_value_names_the_flag():
    assert resolve({**MODEL, "cpu_dtype": "float32"}, env={"MLXRUNNER_CPU_DTYPE": "stored"}).cpu_dtype == "float32"
    with pytest.raises(settings.SettingsError, match="--cpu-dtype: expected float32 or stored"):
        resolve({**MODEL, "cpu_dtype": "bf16"}, env={})
    with pytest.raises(settings.SettingsError, match="MLXRUNNER_CPU_DTYPE: expected float32 or stored"):
        resolve(MODEL, env={"MLXRUNNER_CPU_DTYPE": "half"})


def test_flags_of_the_server():
    flags = {**MODEL, "host": "0.0.0.0", "port": "11500", "queue_depth": "0", "max_body_mb": "2",
             "models_dir": "/models", "log_level": "trace", "prompt_cache_size": "512MiB"}
    got = resolve(flags, env={})
    assert (got.host, got.port, got.queue_depth, got.max_body_bytes, got.models_dir, got.log_level,
            got.prompt_cache_bytes) == ("0.0.0.0", 11500, 0, 2 << 20, "/models", 5, 512 << 20)
    assert resolve({**MODEL, "prompt_cache_size": "0"}, env={}).prompt_cache_bytes == 0
    assert resolve(MODEL, env={}).prompt_cache_bytes == settings.DEFAULT_PROMPT_CACHE_BYTES == 8 << 30
    assert resolve({**MODEL, "max_batch": "64"}, env={}).max_batch == 64
    assert resolve(MODEL, env={}).max_batch is None  # the backend's: DEFAULT_MAX_BATCH
    assert settings.DEFAULT_MAX_BATCH == {"cpu": 8, "gpu": 16}


@pytest.mark.parametrize("env, message", [
    ({"MLXRUNNER_MEMORY_LIMIT": "lots"}, "MLXRUNNER_MEMORY_LIMIT: not a byte size: 'lots'"),
    ({"MLXRUNNER_MEMORY_LIMIT": "16XB"}, "MLXRUNNER_MEMORY_LIMIT: not a byte size"),
    ({"MLXRUNNER_SKIP_MEMORY_CHECK": "maybe"}, "MLXRUNNER_SKIP_MEMORY_CHECK: expected a boolean"),
    ({"MLXRUNNER_RELEASE_TEXT_ENCODER": "2"}, "MLXRUNNER_RELEASE_TEXT_ENCODER: expected a boolean"),
    ({"MLXRUNNER_DENOISE_QUEUE_DEPTH": "-1"}, "MLXRUNNER_DENOISE_QUEUE_DEPTH: must be >= 0, got -1"),
    ({"MLXRUNNER_DENOISE_QUEUE_DEPTH": "two"}, "MLXRUNNER_DENOISE_QUEUE_DEPTH: invalid int value: 'two'"),
])
def test_a_bad_environment_variable_is_named(env, message):
    with pytest.raises(SettingsError, match=message) as info:
        resolve(MODEL, env=env)
    assert not info.value.from_flag


def test_a_bad_cpu_blas_value_is_named():
    with pytest.raises(SettingsError, match="MLXRUNNER_CPU_BLAS: expected auto, mkl, openblas or reference"):
        settings.cpu_blas_requested({"MLXRUNNER_CPU_BLAS": "blis"})


@pytest.mark.parametrize("flags, message", [
    ({"port": "70000"}, "argument --port: 70000 is not a TCP port"),
    ({"port": "http"}, "argument --port: invalid int value: 'http'"),
    ({"queue_depth": "-1"}, "argument --queue-depth: must be >= 0"),
    ({"max_batch": "0"}, "argument --max-batch: must be >= 1"),
    ({"max_body_mb": "0"}, "argument --max-body-mb: must be >= 1"),
    ({"denoise_queue_depth": "-3"}, "argument --denoise-queue-depth: must be >= 0"),
    ({"log_level": "loud"}, "argument --log-level: unknown log level 'loud'"),
    ({"prompt_cache_size": "-1GB"}, "argument --prompt-cache-size: not a byte size: '-1GB'"),
])
def test_a_bad_flag_is_named(flags, message):
    with pytest.raises(SettingsError, match=message) as info:
        resolve({**MODEL, **flags}, env={})
    assert info.value.from_flag


def test_a_good_flag_spares_a_bad_variable_of_the_same_setting():
    env = {"MLXRUNNER_DENOISE_QUEUE_DEPTH": "junk"}
    assert resolve({**MODEL, "denoise_queue_depth": "1"}, env=env).denoise_queue_depth == 1


def test_settings_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolve(MODEL, env={}).port = 1
