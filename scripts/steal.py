"""Steal: the share of CPU time the hypervisor gave to other guests, from two copies of
/proc/stat's first line taken before and after a run (the benches' `steal %` columns)."""


def steal_percent(out, name):
    """Percent steal during run `name`, from `cpu_mark`'s files (scripts/lib.sh) in `out`."""
    before, after = ([int(x) for x in open(f"{out}/{name}.cpu-{when}").read().split()[1:]]
                     for when in ("before", "after"))
    delta = [a - b for a, b in zip(after, before)]
    # user nice system idle iowait irq softirq steal (guest time is already in user).
    return 100.0 * delta[7] / max(sum(delta[:8]), 1)
