"""The heap trimmer: when a trim is due, and that a trim runs here (glibc)."""

from xdsproxy.server.heap import HeapTrimmer, TrimPolicy

MB = 1024 * 1024


def _due(policy: TrimPolicy, rss_mb: int, now: float) -> bool:
    """Two checks at the same RSS: the first sees it arrive, the second sees it settled."""
    policy.due(rss_mb * MB, now)
    return policy.due(rss_mb * MB, now)


def test_a_trim_is_due_only_after_real_growth_and_not_too_often() -> None:
    policy = TrimPolicy(growth_bytes=64 * MB, growth_ratio=0.1, min_interval=10.0)
    policy.trimmed(1000 * MB, now=100.0)
    assert not _due(policy, 1050, now=200.0)  # grew, but less than 64 MB
    assert not _due(policy, 1090, now=200.0)  # 90 MB, but under 10% of the baseline
    assert _due(policy, 1101, now=200.0)
    assert not _due(policy, 2000, now=105.0)  # too soon after the last trim
    assert not _due(policy, 900, now=200.0)  # shrank


def test_no_trim_while_rss_is_still_climbing() -> None:
    policy = TrimPolicy(growth_bytes=64 * MB, growth_ratio=0.1, min_interval=0.0)
    policy.trimmed(100 * MB, now=0.0)
    assert not policy.due(400 * MB, now=1.0)  # a push under way
    assert not policy.due(900 * MB, now=2.0)
    assert policy.due(905 * MB, now=3.0)  # it ended; its memory is still held


def test_small_baselines_need_the_absolute_growth() -> None:
    policy = TrimPolicy(growth_bytes=64 * MB, growth_ratio=0.1, min_interval=0.0)
    policy.trimmed(50 * MB, now=0.0)
    assert not _due(policy, 100, now=1.0)
    assert _due(policy, 120, now=1.0)


def test_trim_runs_and_resets_the_baseline() -> None:
    trimmer = HeapTrimmer()
    assert trimmer.available  # the project's machines run glibc
    junk = [bytearray(3000) for _ in range(100_000)]
    del junk[::2]
    trimmer.trim()
    assert trimmer.trims == 1
    assert trimmer.policy.baseline > 0 and trimmer.policy.last > 0
