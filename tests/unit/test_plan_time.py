"""Step time beyond FLOPs: ZeRO's collectives over the hardware's links, overlap, offload, the bound.

Volumes are checked against the ZeRO paper's formulas computed by hand; times against the ring formula
by hand; the estimate's behaviour on composed jobs (the bound moves from communication to compute as
sequences grow, job hours follow the step time, the link read from hw.interconnect).
"""

import pytest

from hpcllm.config import derive
from hpcllm.plan import estimate, format_table
from hpcllm.plan import formulas as F


@pytest.fixture(scope="module")
def jobs(demo_batch_jobs):
    return demo_batch_jobs


def _estimate(cfg):
    return estimate(cfg, derive(cfg), with_remedies=False)


# A small model by hand: Ψ = 1,000,000 parameters in fp16 (2 bytes), 4 data-parallel ranks.
PSI, P, N = 1_000_000, 2, 4


@pytest.mark.parametrize("stage,elements", [(0, 2 * PSI), (1, 2 * PSI), (2, 2 * PSI), (3, 3 * PSI)])
def test_volumes_per_zero_stage_follow_the_zero_paper(stage, elements):
    """ZeRO paper, section 7: data parallelism moves 2Ψ per step (an all-reduce: reduce-scatter plus
    all-gather), P_os and P_os+g the same 2Ψ, P_os+g+p 3Ψ (1.5x); a ring sends (n-1)/n of each."""
    traffic = F.zero_traffic(stage, PSI, PSI, p=P)
    assert traffic.sent_per_rank(N) == pytest.approx(elements * P * (N - 1) / N)


def test_stage3_volume_with_recomputation_and_accumulation():
    # Checkpointing gathers the parameters a third time for the recomputed forward: 4Ψ.
    assert F.zero_traffic(3, PSI, PSI, p=P, checkpointing=True).sent_per_rank(N) == pytest.approx(4 * PSI * P * 3 / 4)
    # Over 4 micro steps: stage 0/1 reduce once per step, stage 2 reduce-scatters every micro step (its
    # gradients are partitioned) and all-gathers the updated parameters once, stage 3 repeats everything.
    per_step = {stage: F.zero_traffic(stage, PSI, PSI, p=P).sent_per_rank(N, micro_steps=4) for stage in range(4)}
    unit = PSI * P * (N - 1) / N
    assert per_step == pytest.approx({0: 2 * unit, 1: 2 * unit, 2: 5 * unit, 3: 12 * unit})


def test_frozen_parameters_are_gathered_but_not_reduced():
    """An adapter with 1 % trainable: stages 0-2 move only its gradients and updated weights; ZeRO-3
    still gathers every (partitioned) parameter in forward and backward."""
    t = PSI // 100
    assert F.zero_traffic(2, PSI, t, p=P).sent_per_rank(N) == pytest.approx(2 * t * P * 3 / 4)
    assert F.zero_traffic(3, PSI, t, p=P).sent_per_rank(N) == pytest.approx((2 * PSI + t) * P * 3 / 4)


def test_ring_time_by_hand():
    link = F.Link("test", bandwidth=100e9, latency=5e-6)
    # All-reduce of 1 GB over 8 ranks: 2 * 7/8 * 1e9 / 1e11 s, plus 2 * 7 latencies.
    assert F.ring_seconds("all_reduce", 1e9, 8, link) == pytest.approx(2 * 7 / 8 * 1e-2 + 14 * 5e-6)
    # An all-gather in 10 calls pays 10 x 7 latencies once each.
    assert F.ring_seconds("all_gather", 1e9, 8, link, calls=10) == pytest.approx(7 / 8 * 1e-2 + 70 * 5e-6)
    assert F.ring_seconds("all_gather", 1e9, 1, link) == 0


def test_link_is_the_node_link_inside_a_node_and_the_nics_across(jobs):
    hw = jobs("hw=a100x8").hw
    assert F.collective_link(hw).bandwidth == 230e9 and F.collective_link(hw).name == "nvswitch"
    hw.nodes = 2
    assert F.collective_link(hw).bandwidth == 90e9  # hw.interconnect=ib: 4 x HDR by default
    assert "ib" in F.collective_link(hw).name
    hw.interconnect = "ethernet"
    assert F.collective_link(hw).bandwidth == 2.5e9
    hw.inter_node_bw_gbs = 25.0  # one HDR NIC per node, as the user knows their cluster
    assert F.collective_link(hw).bandwidth == 25e9


def test_overlap_hides_reductions_behind_backward_but_not_the_last_bucket():
    link = F.Link("test", bandwidth=10e9, latency=0.0)
    traffic = F.zero_traffic(2, PSI * 1000, PSI * 1000, p=P)  # 2 GB of gradients
    kwargs = dict(micro_steps=1, traffic=traffic, ranks=N, link=link, reduce_bucket=100_000_000, p=P,
                  gather_calls=0, largest_module_bytes=0)
    reduce = 3 / 4 * 2e9 / 10e9
    gather = 3 / 4 * 2e9 / 10e9  # all-gather of the updated parameters after the step
    hidden = F.step_seconds(compute_micro=3.0, overlap_comm=True, **kwargs)
    bucket = 3 / 4 * 2e8 / 10e9
    assert hidden.total == pytest.approx(3.0 + bucket + gather)
    exposed = F.step_seconds(compute_micro=3.0, overlap_comm=False, **kwargs)
    assert exposed.total == pytest.approx(3.0 + reduce + gather)
    assert hidden.communication == exposed.communication == pytest.approx(reduce + gather)
    assert hidden.bound == "compute"
    # With little compute the reductions cannot hide and the step is communication bound.
    assert F.step_seconds(compute_micro=0.01, overlap_comm=True, **kwargs).bound == "communication"


def test_zero3_bound_moves_from_communication_to_compute_as_sequences_grow(jobs):
    """LLaMA-2-7B full fine-tuning under ZeRO-3 on 4 x A40 over PCIe, micro batch 1: each micro step
    gathers 13.5 GB of parameters twice and reduce-scatters 13.5 GB of gradients whatever the sequence,
    while compute grows with it."""
    bounds, times, fractions = [], [], []
    for seq in (128, 256, 512, 1024, 2048, 4096):
        est = _estimate(jobs("model=llama2_7b", "hw=a40x4", "zero=stage3", "method=sft", "method.micro_batch_size=1",
                             f"method.seq_len={seq}"))
        bounds.append(est.bound)
        times.append(est.step_time_s)
        fractions.append(est.time_breakdown["compute"] / est.step_time_s)
    assert bounds[0] == "communication" and bounds[-1] == "compute"
    assert bounds == sorted(bounds, key=lambda b: b == "compute")  # switches once
    assert times == sorted(times) and fractions == sorted(fractions)
    # At 128 tokens the step is several times what FLOPs alone predict.
    short = _estimate(jobs("model=llama2_7b", "hw=a40x4", "zero=stage3", "method=sft", "method.micro_batch_size=1",
                           "method.seq_len=128"))
    assert short.step_time_s > 4 * short.time_breakdown["compute"]


def test_zero3_without_prefetch_waits_for_every_gather(jobs):
    job = ("model=llama2_7b", "hw=a100x8", "zero=stage3", "method=sft", "method.seq_len=512")
    prefetched, waiting = _estimate(jobs(*job)), _estimate(jobs(*job, "zero.stage3_prefetch_bucket_size=0"))
    gathers = 2 * 2 * 6.74e9 * 7 / 8 / 230e9  # forward and backward, bf16, over NVSwitch
    assert prefetched.time_breakdown["exposed_communication"] < 0.1 * gathers
    assert waiting.step_time_s - prefetched.step_time_s == pytest.approx(gathers, rel=0.1)


def test_faster_links_are_never_slower_and_zero3_costs_most_on_a_slow_link(jobs):
    job = ("model=llama2_7b", "method=sft", "method.micro_batch_size=1", "method.seq_len=512")
    pcie, nvswitch = _estimate(jobs(*job, "hw=a40x4", "zero=stage3")), _estimate(jobs(*job, "hw=a100x8", "zero=stage3"))
    assert nvswitch.time_breakdown["communication"] < pcie.time_breakdown["communication"]
    assert nvswitch.step_time_s < pcie.step_time_s
    times = [_estimate(jobs(*job, "hw=a40x4", f"zero={z}")).step_time_s for z in ("stage2", "stage3")]
    assert times[0] < times[1]


def test_two_nodes_over_ethernet_are_communication_bound_and_job_hours_follow(jobs):
    one = _estimate(jobs("model=llama2_7b", "hw=a100x8", "zero=stage3", "method=sft", "method.seq_len=1024",
                         "train.max_steps=1000"))
    two = _estimate(jobs("model=llama2_7b", "hw=a100x8", "hw.nodes=2", "hw.interconnect=ethernet", "zero=stage3",
                         "method=sft", "method.seq_len=1024", "train.max_steps=1000"))
    assert one.bound == "compute" and two.bound == "communication"
    assert two.link == "nvswitch + ethernet"
    assert two.job_hours == pytest.approx(1000 * two.step_time_s / 3600, rel=0.01)
    assert two.job_hours > 3 * one.job_hours


def test_offload_adds_host_copies_and_cpu_adam(jobs):
    job = ("model=llama2_7b", "hw=a100x8", "method=sft", "method.seq_len=512", "method.micro_batch_size=1")
    plain, offload = _estimate(jobs(*job, "zero=stage2")), _estimate(jobs(*job, "zero=stage2_offload"))
    assert plain.time_breakdown["offload"] == 0
    cfg = jobs(*job, "zero=stage2_offload")
    part = offload.trainable_params / 8
    # Gradients out and 16-bit parameters back over PCIe; CPU Adam on 128 / 8 = 16 cores per rank.
    expected = 2 * 2 * part / (cfg.hw.host_bw_gbs * 1e9) + part / (16 * F.CPU_ADAM_PARAMS_PER_CORE_S)
    assert offload.time_breakdown["offload"] == pytest.approx(expected, rel=1e-3)
    assert offload.step_time_s == pytest.approx(plain.step_time_s + expected, rel=0.01)
    params = _estimate(jobs(*job, "zero=stage3_offload"))
    assert params.time_breakdown["offload"] > _estimate(jobs(*job, "zero=stage3_offload",
                                                             "zero.offload_param=false")).time_breakdown["offload"]


def test_time_line_names_the_bound(jobs):
    cfg = jobs("model=llama2_7b", "hw=a40x4", "zero=stage3", "method=sft", "method.micro_batch_size=1",
               "method.seq_len=128")
    table = format_table(cfg, _estimate(cfg))
    assert "bound by communication" in table and "pcie" in table


def test_readme_time_lines_are_what_the_estimate_prints(jobs):
    import os

    from hpcllm.config import PROJECT_ROOT

    cfg = jobs("model=llama2_7b", "method=sft", "hw=a40x4", "zero=stage3", "method.seq_len=256",
               "method.micro_batch_size=1", "train.max_steps=1000")
    table = format_table(cfg, _estimate(cfg)).splitlines()
    readme = open(os.path.join(PROJECT_ROOT, "README.md")).read()
    time_lines = [line for line in table if line.strip().startswith(("time ", "bound by"))]
    assert len(time_lines) == 2 and all(line in readme for line in time_lines)
