#!/usr/bin/env python3
"""Writes meter-telemetry.jsonl: 15 minutes of a three-phase energy meter read every second.

Twenty properties as a Modbus meter (an SDM630-class device) reports them, with the precision
the meter's registers carry and noise of the size real readings show: mains voltage wandering
by tenths of a volt, a load that steps when machines start and stop, frequency within a few
millihertz, energy counters that only climb. Seeded, so the committed file is reproducible:

    python3 benches/data/make_meter_corpus.py > benches/data/meter-telemetry.jsonl
"""

import json
import math
import random

rng = random.Random(20261202)
T0 = 1_764_633_600_000  # 2025-12-02T00:00:00Z, ms
v = [230.4, 229.8, 231.1]
load = [12.0, 9.5, 14.2]  # A per phase
pf = 0.93
f = 50.0
import_kwh = 18234.512
export_kwh = 102.337
temp = 38.2

for s in range(900):
    # Machines start and stop now and then; the load follows with a little ripple.
    if rng.random() < 0.02:
        p = rng.randrange(3)
        load[p] = max(0.5, load[p] + rng.choice([-1, 1]) * rng.uniform(2, 8))
    amps = [max(0.0, l * (1 + rng.gauss(0, 0.01))) for l in load]
    v = [x + rng.gauss(0, 0.08) + (230.0 - x) * 0.01 for x in v]
    f += rng.gauss(0, 0.002) + (50.0 - f) * 0.05
    pf = min(0.99, max(0.80, pf + rng.gauss(0, 0.002)))
    watts = [vi * ai * pf for vi, ai in zip(v, amps)]
    total_w = sum(watts)
    apparent = sum(vi * ai for vi, ai in zip(v, amps))
    reactive = math.sqrt(max(0.0, apparent**2 - total_w**2))
    import_kwh += total_w / 3_600_000
    temp += rng.gauss(0, 0.02) + (40.0 - temp) * 0.001
    neutral = abs(amps[0] + amps[1] * complex(-0.5, -0.866) + amps[2] * complex(-0.5, 0.866))
    values = {
        "voltage_l1": round(v[0], 2),
        "voltage_l2": round(v[1], 2),
        "voltage_l3": round(v[2], 2),
        "current_l1": round(amps[0], 3),
        "current_l2": round(amps[1], 3),
        "current_l3": round(amps[2], 3),
        "power_l1": round(watts[0], 1),
        "power_l2": round(watts[1], 1),
        "power_l3": round(watts[2], 1),
        "power_total": round(total_w, 1),
        "reactive_power_total": round(reactive, 1),
        "apparent_power_total": round(apparent, 1),
        "power_factor": round(pf, 3),
        "frequency": round(f, 3),
        "import_energy": round(import_kwh, 3),
        "export_energy": round(export_kwh, 3),
        "thd_voltage_l1": round(2.1 + rng.gauss(0, 0.05), 2),
        "thd_current_l1": round(8.4 + rng.gauss(0, 0.3), 2),
        "neutral_current": round(neutral, 3),
        "temperature": round(temp, 1),
    }
    print(json.dumps({"ts": T0 + s * 1000, "values": values}, separators=(",", ":")))
