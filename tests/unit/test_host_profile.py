"""benchmarks/gpu/host_profile.py's bucketing of a native profile's stacks (py-spy's raw lines)."""

from benchmarks.gpu.host_profile import BUCKETS, summarize

CUBLAS, COMMIT, REST = BUCKETS[0][0], BUCKETS[1][0], BUCKETS[-1][0]

STACKS = "\n".join([
    # inside the request: a product under MLX's evaluation goes to the products, not the bookkeeping around it
    "<module> (x.py:1);follow_up_request (host_profile.py:9);mlxr::Decoder::forward;mlx::core::eval_impl;"
    "mlx::core::gpu::eval;mlx::core::Matmul::eval_gpu;cublasLtMatmul 6",
    "<module> (x.py:1);follow_up_request (host_profile.py:9);mlx::core::eval_impl;mlx::core::Event::signal;"
    "mlx::core::cu::CommandEncoder::commit;cudaGraphLaunch 3",
    "<module> (x.py:1);follow_up_request (host_profile.py:9);LanguageModel.stream (model.py:3) 1",
    # outside it (the model's load): not counted
    "<module> (x.py:1);LanguageModel.__init__ (model.py:2);mlx::core::Matmul::eval_gpu 50",
    "not a stack line",
])


def test_buckets_take_the_first_match_and_only_the_request():
    report = summarize(STACKS)
    assert report["samples"] == 10
    assert report["shares"][CUBLAS] == 0.6
    assert report["shares"][COMMIT] == 0.3
    assert report["shares"][REST] == 0.1
    assert abs(sum(report["shares"].values()) - 1) < 1e-12


def test_a_frame_above_the_request_does_not_decide_its_bucket():
    # A Matmul frame outside (above) the request frame must not pull the request's own samples into the products.
    report = summarize("mlx::core::Matmul::eval_gpu;follow_up_request (h.py:1);LanguageModel.stream (m.py:1) 4")
    assert report["shares"][REST] == 1.0 and report["shares"][CUBLAS] == 0.0


def test_no_request_samples():
    report = summarize("<module> (x.py:1);main (x.py:2) 5")
    assert report["samples"] == 0 and set(report["shares"].values()) == {0.0}
