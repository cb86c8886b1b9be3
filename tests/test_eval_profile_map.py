"""Replicate-retrieval mAP of per-well profiles: identical replicates give 1.0, shuffled labels chance level, AP
equals a hand computation, the per-well median and plate normalisation equal hand loops, JUMP metadata tables join,
and `dinocell eval profile-map` runs the whole chain on SyntheticCellPainting."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
from eval_data import tiny_config

from dinocell.eval.errors import EvalError
from dinocell.eval.profile_map import (
    canonical_well,
    profile_map,
    replicate_map,
    robust_z_per_plate,
    well_profiles,
)


def plates_of(n_perts: int, n_plates: int, n_controls: int, sites: int = 2, dim: int = 8, seed: int = 0,
              noise: float = 0.0) -> tuple[np.ndarray, pd.DataFrame]:
    """Fields on `n_plates` plates, each with one well per perturbation and `n_controls` control wells; a
    perturbation's fields share one profile (plus `noise`); control wells are the same on every plate."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_perts, dim)) * 3
    controls = rng.normal(size=(n_controls, dim))
    rows, feats = [], []
    for p in range(n_plates):
        for w in range(n_perts + n_controls):
            control = w >= n_perts
            for s in range(sites):
                rows.append({"plate": f"P{p}", "well": f"B{w + 1}", "site": s,
                             "perturbation": "DMSO" if control else f"cmpd{w}",
                             "pert_type": "negcon" if control else "trt"})
                base = controls[w - n_perts] if control else centres[w]
                feats.append(base + noise * rng.normal(size=dim))
    return np.array(feats), pd.DataFrame(rows)


def hand_ap(profiles: np.ndarray, perts: list[str], is_control: list[bool]) -> dict[int, float]:
    """AP of every treated well written out: rank its replicates and the negatives by cosine, mean precision at
    the replicates' ranks. Negatives: the controls when there are any, else the other perturbations' wells."""
    unit = profiles / np.linalg.norm(profiles, axis=1, keepdims=True)
    any_control = any(is_control)
    result = {}
    for q in range(len(perts)):
        if is_control[q]:
            continue
        candidates = [j for j in range(len(perts)) if j != q and (
            (perts[j] == perts[q] and not is_control[j]) or (is_control[j] if any_control else perts[j] != perts[q]))]
        positives = [perts[j] == perts[q] and not is_control[j] for j in candidates]
        if not any(positives):
            continue
        order = np.argsort(-(unit[candidates] @ unit[q]), kind="stable")
        hits, precisions = 0, []
        for rank, j in enumerate(order, start=1):
            if positives[j]:
                hits += 1
                precisions.append(hits / rank)
        result[q] = float(np.mean(precisions))
    return result


def test_identical_replicates_give_map_one_and_every_perturbation_retrieved():
    feats, meta = plates_of(n_perts=6, n_plates=4, n_controls=5)
    result = profile_map(feats, meta, null_size=2000)
    summary = result["summary"]
    assert summary["mean_average_precision"] == pytest.approx(1.0) and summary["fraction_retrieved"] == 1.0
    assert summary["n_perturbations"] == 6 and summary["n_control_wells"] == 20 and summary["n_wells"] == 44
    assert summary["negatives"] == "negcon" and summary["n_fields"] == 88
    assert (result["perturbations"]["n_wells"] == 4).all()
    assert (result["perturbations"]["corrected_p_value"] < 0.05).all()


def test_shuffled_labels_give_chance_level():
    feats, meta = plates_of(n_perts=40, n_plates=4, n_controls=8, noise=0.5, seed=1)
    treated = meta["pert_type"] == "trt"
    wells = meta[treated].drop_duplicates(["plate", "well"])[["plate", "well", "perturbation"]]
    shuffled = wells.assign(perturbation=np.random.default_rng(2).permutation(wells["perturbation"].to_numpy()))
    meta = meta.drop(columns="perturbation").merge(
        pd.concat([shuffled, meta[~treated].drop_duplicates(["plate", "well"])[["plate", "well", "perturbation"]]]),
        on=["plate", "well"])
    summary = profile_map(feats, meta, null_size=1000)["summary"]
    # chance: the AP of 3 replicates at random ranks among them and the 4 x 8 control wells, by simulation
    rng = np.random.default_rng(3)
    relevant = np.array([1, 1, 1] + [0] * 32)
    draws = [rng.permutation(relevant) for _ in range(20000)]
    chance = np.mean([np.mean((np.cumsum(d) / np.arange(1, 36))[d == 1]) for d in draws])
    assert summary["mean_average_precision"] == pytest.approx(chance, abs=0.05)
    assert summary["fraction_retrieved"] <= 0.1


@pytest.mark.parametrize("with_controls", [True, False])
def test_average_precision_equals_a_hand_computation(with_controls):
    rng = np.random.default_rng(4)
    perts = [f"c{i % 5}" for i in range(20)] + ["DMSO"] * (6 if with_controls else 0)
    profiles = rng.normal(size=(len(perts), 6)) + np.array([hash(p) % 7 for p in perts])[:, None] * 0.3
    is_control = [p == "DMSO" for p in perts]
    wells = pd.DataFrame({"perturbation": perts, "pert_type": ["negcon" if c else "trt" for c in is_control]})
    ap, maps, negatives = replicate_map(profiles, wells, null_size=500)
    expected = hand_ap(profiles, perts, is_control)
    assert negatives == ("negcon" if with_controls else "other perturbations")
    assert np.isnan(ap[is_control]).all() and len(expected) == 20
    for q, value in expected.items():
        assert ap[q] == pytest.approx(value, abs=1e-9)
    for pert, group in pd.Series(expected).groupby([perts[q] for q in expected]):
        row = maps[maps["perturbation"] == pert].iloc[0]
        assert row["mean_average_precision"] == pytest.approx(group.mean(), abs=1e-9) and row["n_wells"] == 4


def test_well_median_and_robust_z_equal_hand_loops():
    rng = np.random.default_rng(5)
    fields = pd.DataFrame({"plate": ["P1"] * 7 + ["P2"] * 5,
                           "well": ["a1", "A01", "A2", "A2", "A2", "b3", "B03", "A1", "A1", "C4", "C4", "D5"]})
    feats = rng.normal(size=(12, 3))
    profiles, wells = well_profiles(feats, fields)
    assert wells[["plate", "well"]].values.tolist() == [["P1", "A01"], ["P1", "A02"], ["P1", "B03"], ["P2", "A01"],
                                                        ["P2", "C04"], ["P2", "D05"]]
    assert wells["n_fields"].tolist() == [2, 3, 2, 2, 2, 1]
    np.testing.assert_allclose(profiles[1], np.median(feats[2:5], axis=0))
    np.testing.assert_allclose(profiles[0], (feats[0] + feats[1]) / 2)

    profiles = rng.normal(size=(10, 3))
    profiles[:, 2] = 1.0  # a constant feature: MAD 0 -> 0 after normalisation
    plates = ["P1"] * 6 + ["P2"] * 4
    control = [True, True, True, False, False, False, True, False, False, False]  # P2: one control -> all wells
    normalised, reference = robust_z_per_plate(profiles, plates, control)
    assert reference == {"P1": "negcon", "P2": "all wells"}
    for rows, ref in ((range(6), [0, 1, 2]), (range(6, 10), [6, 7, 8, 9])):
        for f in range(2):
            med = np.median(profiles[ref, f])
            mad = np.median(np.abs(profiles[ref, f] - med)) * 1.4826
            np.testing.assert_allclose(normalised[list(rows), f], (profiles[list(rows), f] - med) / mad)
    assert (normalised[:, 2] == 0).all()
    assert canonical_well(" c7 ") == "C07" and canonical_well("AB012") == "AB12"
    with pytest.raises(EvalError, match="well name '7' is not <row letters><column number>"):
        canonical_well("7")


def test_jump_metadata_tables_join_filter_and_count(tmp_path):
    feats, meta = plates_of(n_perts=4, n_plates=3, n_controls=3, noise=0.1)
    meta = meta.assign(source="source_2", well=meta["well"].map(canonical_well)).drop(
        columns=["perturbation", "pert_type"])
    wells = meta.drop_duplicates(["plate", "well"])
    jcp = {f"B{w:02d}": f"JCP2022_{w:06d}" for w in range(1, 5)} | {"B05": "JCP2022_033924", "B06": "JCP2022_033924",
                                                                      "B07": "JCP2022_999999"}
    table = pd.DataFrame({"Metadata_Source": "source_2", "Metadata_Plate": wells["plate"],
                          "Metadata_Well": wells["well"], "Metadata_JCP2022": wells["well"].map(jcp)})
    table = table[table["Metadata_Well"] != "B04"]  # one well the metadata does not know
    with gzip.open(tmp_path / "well.csv.gz", "wt") as f:
        table.to_csv(f, index=False)
    controls = pd.DataFrame({"Metadata_JCP2022": ["JCP2022_999999", "JCP2022_033924"],
                             "Metadata_pert_type": ["empty", "negcon"], "Metadata_Name": ["Empty", "DMSO"]})
    plates = pd.DataFrame({"Metadata_Source": "source_2", "Metadata_Batch": "b1", "Metadata_Plate": ["P0", "P1", "P2"],
                           "Metadata_PlateType": ["COMPOUND", "COMPOUND", "DMSO"]})
    from dinocell.eval.profile_map import read_table

    result = profile_map(feats, meta, metadata=[read_table(tmp_path / "well.csv.gz")], controls=controls,
                         plates=plates, plate_types=["COMPOUND"], null_size=500)
    summary = result["summary"]
    assert summary["n_wells_unknown_perturbation"] == 2 and summary["n_wells_empty"] == 2
    assert summary["n_control_wells"] == 4 and summary["n_perturbations"] == 3 and summary["n_wells"] == 10
    assert set(result["wells"]["plate"]) == {"P0", "P1"}  # the DMSO plate is filtered out
    with pytest.raises(EvalError, match="has no perturbation column: expected one of Metadata_JCP2022, "
                                        "Metadata_perturbation, perturbation \\(closest: 'Metadata_JCP2021'\\)"):
        profile_map(feats, meta, metadata=[table.rename(columns={"Metadata_JCP2022": "Metadata_JCP2021"})])


def test_profile_map_cli_runs_the_chain_on_synthetic_cell_painting(tmp_path, capsys):
    from dinocell.commands.eval_profile_map import main

    out = tmp_path / "map"
    data = "SyntheticCellPainting:size=48:image_size=32:cell_radius=6:sites_per_well=2:plate_format=96"
    assert main(["--config-file", tiny_config(tmp_path), "--input", data, "--null-size", "200", "--num-workers",
                 "0", "--output-dir", str(out)]) == 0
    results = json.loads((out / "profile-map.json").read_text())
    summary = results["summary"]
    assert summary["n_fields"] == 48 and summary["n_wells"] == 24 and summary["n_control_wells"] == 6
    assert summary["n_perturbations"] == 3 and 0.0 <= summary["mean_average_precision"] <= 1.0
    assert [m["perturbation"] for m in results["perturbations"]] == ["phenotype_1", "phenotype_2", "phenotype_3"]
    wells = pd.read_csv(out / "profile-map-wells.csv")
    assert len(wells) == 24 and set(wells["plate"]) == {"SYN-train-000"}
    assert "fraction_retrieved" in capsys.readouterr().out
