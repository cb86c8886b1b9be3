"""Replicate retrieval of per-well profiles (mAP), the JUMP consortium's measure of phenotypic activity.

Pipeline, as the consortium evaluates profiles:
1. Per-well profiles: the median of the field (site) features of each well, keyed by (source, plate, well).
2. Per-plate normalisation: a robust z-score of every feature against the plate's negative-control wells
   ((x - median) / (1.4826 * MAD)); on a plate with fewer than 2 negative-control wells, against all its wells.
   A feature whose MAD is 0 on a plate is set to 0 there (it carries no information against the reference).
3. Average precision per treated well with `copairs`: the well's replicates (other wells of the same perturbation)
   are the positives; the negatives are the negative-control wells when there are any, else the wells of every
   other perturbation. Similarity: cosine. mAP of a perturbation = mean AP of its wells.
4. Significance: copairs' permutation p-value of each mAP (`null_size` draws), Benjamini-Hochberg corrected over
   the perturbations; "retrieved" = corrected p < `threshold` (0.05). The fraction retrieved is the share of
   perturbations (with at least 2 wells) that are retrieved.

Wells whose perturbation is unknown, or `empty` (JUMP's JCP2022_999999), are left out and counted.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dinocell.data.io.remote import is_remote, open_input
from dinocell.eval.errors import EvalError

# role -> accepted column names (case-insensitive), JUMP's first
COLUMNS = {
    "source": ("Metadata_Source", "source"),
    "plate": ("Metadata_Plate", "plate"),
    "well": ("Metadata_Well", "well"),
    "perturbation": ("Metadata_JCP2022", "Metadata_perturbation", "perturbation"),
    "pert_type": ("Metadata_pert_type", "pert_type"),
    "plate_type": ("Metadata_PlateType", "plate_type"),
}
NEGCON, EMPTY = "negcon", "empty"
MIN_CONTROL_WELLS = 2
MAD_TO_STD = 1.4826  # MAD of a normal distribution x 1.4826 = its standard deviation


def canonical_well(well: Any) -> str:
    """'a1', 'A1', 'A001' -> 'A01' (row letters upper-cased, column with at least two digits)."""
    match = re.fullmatch(r"\s*([A-Za-z]+)0*(\d+)\s*", str(well))
    if not match:
        raise EvalError(f"well name {well!r} is not <row letters><column number>, e.g. A01")
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def find_column(table: pd.DataFrame, role: str, where: str, *, required: bool = True,
                override: str | None = None) -> str | None:
    """The column of `table` that plays `role` (COLUMNS lists the names tried), or None when optional."""
    names = (override,) if override else COLUMNS[role]
    by_lower = {c.lower(): c for c in table.columns}
    for name in names:
        if name.lower() in by_lower:
            return by_lower[name.lower()]
    if not required:
        return None
    close = difflib.get_close_matches(names[0], list(table.columns), n=1)
    hint = f" (closest: '{close[0]}')" if close else ""
    raise EvalError(f"{where} has no {role} column: expected one of {', '.join(names)}{hint}; its columns are "
                    f"{', '.join(map(str, table.columns))}")


def read_table(location: str | Path) -> pd.DataFrame:
    """A CSV (optionally .gz) or parquet table, every column as text; a local path or an s3:// or http(s):// URL."""
    name = str(location)
    if not is_remote(name) and not Path(name).is_file():
        raise FileNotFoundError(f"metadata table {name} does not exist")
    with open_input(name) as f:  # a URL that does not exist raises FileNotFoundError naming it
        if name.endswith(".parquet"):
            return pd.read_parquet(f).astype(str)
        compression = "gzip" if name.endswith(".gz") else None  # pandas infers it from file names, not from streams
        return pd.read_csv(f, dtype=str, keep_default_na=False, compression=compression)


def well_profiles(features: np.ndarray, fields: pd.DataFrame) -> tuple[np.ndarray, pd.DataFrame]:
    """Median over the fields of each well. `fields` (one row per feature row) has plate and well columns (and
    source when known); returns (profiles [W, D], wells table with the keys and `n_fields`), sorted by key."""
    keys = [k for k in ("source", "plate", "well") if k in fields.columns]
    frame = fields[keys].reset_index(drop=True).copy()
    frame["well"] = frame["well"].map(canonical_well)
    groups = frame.groupby(keys, sort=True).indices
    profiles = np.stack([np.median(features[rows], axis=0) for rows in groups.values()]).astype(np.float64)
    wells = pd.DataFrame(list(groups.keys()), columns=keys)
    wells["n_fields"] = [len(rows) for rows in groups.values()]
    return profiles, wells


def robust_z_per_plate(profiles: np.ndarray, plates: Sequence[str], is_control: Sequence[bool]) -> tuple[
        np.ndarray, dict[str, str]]:
    """Robust z-score of every plate's wells against its negative controls (or all its wells when it has fewer
    than MIN_CONTROL_WELLS); returns (normalised profiles, plate -> reference used)."""
    plates, is_control = np.asarray(plates), np.asarray(is_control, bool)
    out = np.zeros_like(profiles, dtype=np.float64)
    reference = {}
    for plate in np.unique(plates):
        rows = plates == plate
        controls = rows & is_control
        use = controls if controls.sum() >= MIN_CONTROL_WELLS else rows
        reference[str(plate)] = "negcon" if use is controls else "all wells"
        median = np.median(profiles[use], axis=0)
        scale = MAD_TO_STD * np.median(np.abs(profiles[use] - median), axis=0)
        safe = np.where(scale > 0, scale, 1.0)
        out[rows] = np.where(scale > 0, (profiles[rows] - median) / safe, 0.0)
    return out, reference


def annotate_wells(
    wells: pd.DataFrame,
    fields_meta: pd.DataFrame,
    metadata: Sequence[pd.DataFrame] = (),
    controls: pd.DataFrame | None = None,
    plates: pd.DataFrame | None = None,
    *,
    plate_types: Sequence[str] = (),
    negcon: Sequence[str] = (),
    perturbation_column: str | None = None,
) -> pd.DataFrame:
    """Add `perturbation` and `pert_type` (negcon / trt / ...) to the wells table.

    Sources, first match wins: `metadata` tables (JUMP well.csv.gz, or any table with plate/well/perturbation
    columns, optionally source and pert_type), else the fields' own meta (`perturbation`, `pert_type`, as
    SyntheticCellPainting gives). The control type comes from a pert_type column, the `controls` table (JUMP
    perturbation_control.csv) or the `negcon` perturbation ids. `plates` (JUMP plate.csv.gz) with `plate_types`
    keeps the plates of those types only.
    """
    wells = wells.copy()
    if metadata:
        wells = _join_metadata(wells, metadata, perturbation_column)
    else:
        if "perturbation" not in fields_meta.columns:
            raise EvalError("no perturbation for the wells: the samples' meta has no 'perturbation'; pass a metadata "
                            "table with plate/well/perturbation columns (JUMP: well.csv.gz)")
        keys = [k for k in ("source", "plate", "well") if k in wells.columns]
        per_well = fields_meta.assign(well=fields_meta["well"].map(canonical_well)).drop_duplicates(keys)
        columns = keys + [c for c in ("perturbation", "pert_type") if c in per_well.columns]
        wells = wells.merge(per_well[columns], on=keys, how="left")
    if controls is not None:
        pert, kind = (find_column(controls, r, "the controls table") for r in ("perturbation", "pert_type"))
        by_pert = dict(zip(controls[pert], controls[kind].str.lower()))
        known = wells["pert_type"] if "pert_type" in wells.columns else pd.Series(np.nan, index=wells.index)
        wells["pert_type"] = known.where(known.notna() & (known != ""), wells["perturbation"].map(by_pert))
    if "pert_type" not in wells.columns:
        wells["pert_type"] = np.nan
    wells.loc[wells["perturbation"].isin(list(negcon)), "pert_type"] = NEGCON
    wells["pert_type"] = wells["pert_type"].fillna("trt").replace("", "trt").str.lower()
    if plates is not None:
        plate_col = find_column(plates, "plate", "the plates table")
        type_col = find_column(plates, "plate_type", "the plates table")
        plate_type = dict(zip(plates[plate_col], plates[type_col]))
        wells["plate_type"] = wells["plate"].map(plate_type)
        if plate_types:
            wells = wells[wells["plate_type"].isin(list(plate_types))]
    return wells.reset_index(drop=True)


def _join_metadata(wells: pd.DataFrame, metadata: Sequence[pd.DataFrame], perturbation_column: str | None) -> (
        pd.DataFrame):
    parts = []
    for i, table in enumerate(metadata):
        where = f"metadata table {i + 1}"
        columns = {
            "plate": find_column(table, "plate", where),
            "well": find_column(table, "well", where),
            "perturbation": find_column(table, "perturbation", where, override=perturbation_column),
        }
        for optional in ("source", "pert_type"):
            if (name := find_column(table, optional, where, required=False)) is not None:
                columns[optional] = name
        part = table[list(columns.values())].rename(columns={v: k for k, v in columns.items()})
        part["well"] = part["well"].map(canonical_well)
        parts.append(part)
    table = pd.concat(parts, ignore_index=True)
    keys = [k for k in ("source", "plate", "well") if k in wells.columns and k in table.columns]
    return wells.merge(table.drop_duplicates(keys), on=keys, how="left")


def replicate_map(
    profiles: np.ndarray,
    wells: pd.DataFrame,
    *,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
) -> tuple[np.ndarray, pd.DataFrame, str]:
    """(AP of each well, NaN for controls and single wells; per-perturbation mAP table; the negatives used), with
    copairs. `wells` has perturbation and pert_type; controls are the wells with pert_type negcon."""
    try:
        from copairs.map import average_precision, mean_average_precision
    except ImportError:
        raise EvalError("replicate mAP needs copairs: pip install copairs (or pip install 'dinocell[eval]')") from None

    meta = wells[["perturbation", "pert_type"]].reset_index(drop=True).copy()
    is_control = (meta["pert_type"] == NEGCON).to_numpy()
    if is_control.any():
        # each control well its own reference group: controls are never positives, and they are the only negatives
        meta["reference"] = np.where(is_control, np.arange(len(meta)), -1)
        pos_sameby, neg_diffby, negatives = ["perturbation", "reference"], ["perturbation", "reference"], "negcon"
    else:
        pos_sameby, neg_diffby, negatives = ["perturbation"], ["perturbation"], "other perturbations"
    counts = meta.loc[~is_control, "perturbation"].value_counts()
    if not (counts >= 2).any():
        raise EvalError("no perturbation has 2 or more wells: replicate retrieval needs replicate wells")
    ap = average_precision(meta, profiles, pos_sameby=pos_sameby, pos_diffby=[], neg_sameby=[],
                           neg_diffby=neg_diffby, distance="cosine", progress_bar=False)
    per_well = np.where(is_control, np.nan, ap["average_precision"].to_numpy(dtype=np.float64))
    scored = ap[~np.isnan(per_well)].reset_index(drop=True)
    maps = mean_average_precision(scored, ["perturbation"], null_size=null_size, threshold=threshold, seed=seed,
                                  progress_bar=False)
    n_wells = scored.groupby("perturbation").size()
    maps = maps.drop(columns=["indices"]).assign(n_wells=maps["perturbation"].map(n_wells))
    return per_well, maps.sort_values("perturbation").reset_index(drop=True), negatives


def profile_map(
    features: np.ndarray,
    fields_meta: pd.DataFrame,
    *,
    metadata: Sequence[pd.DataFrame] = (),
    controls: pd.DataFrame | None = None,
    plates: pd.DataFrame | None = None,
    plate_types: Sequence[str] = (),
    negcon: Sequence[str] = (),
    perturbation_column: str | None = None,
    null_size: int = 10000,
    threshold: float = 0.05,
    seed: int = 0,
) -> dict[str, Any]:
    """The whole pipeline on field features [N, D] and their meta (plate, well, source, ... one row per field).

    Returns {"summary": {...}, "perturbations": mAP table, "wells": the kept wells with their AP (NaN for controls
    and perturbations with one well)}.
    """
    if len(features) != len(fields_meta):
        raise EvalError(f"{len(features)} feature rows but {len(fields_meta)} metadata rows")
    for role in ("plate", "well"):
        if role not in fields_meta.columns:
            raise EvalError(f"the samples have no '{role}' in their meta: profile mAP needs plate-based data "
                            "(JUMP fields, or SyntheticCellPainting's plate layout)")
    profiles, wells = well_profiles(features, fields_meta)
    wells = wells.assign(row=np.arange(len(wells)))
    wells = annotate_wells(wells, fields_meta, metadata, controls, plates, plate_types=plate_types, negcon=negcon,
                           perturbation_column=perturbation_column)
    unknown = wells["perturbation"].isna() | (wells["perturbation"] == "")
    empty = wells["pert_type"] == EMPTY
    kept = wells[~unknown & ~empty].reset_index(drop=True)
    if kept.empty:
        raise EvalError("no well has a known perturbation: check that the metadata's plate and well names match the "
                        f"samples' (e.g. plate {wells['plate'].iloc[0]!r}, well {wells['well'].iloc[0]!r})")
    normalised, reference = robust_z_per_plate(profiles[kept["row"]], kept["plate"].tolist(),
                                               (kept["pert_type"] == NEGCON).tolist())
    ap, maps, negatives = replicate_map(normalised, kept, null_size=null_size, threshold=threshold, seed=seed)
    kept = kept.drop(columns=["row"]).assign(average_precision=ap)
    summary = {
        "mean_average_precision": float(maps["mean_average_precision"].mean()),
        "fraction_retrieved": float(maps["below_corrected_p"].mean()),
        "n_perturbations": int(len(maps)),
        "n_retrieved": int(maps["below_corrected_p"].sum()),
        "n_perturbations_single_well": int(((kept["pert_type"] != NEGCON).groupby(kept["perturbation"]).sum() == 1)
                                           .sum()),
        "n_wells": int(len(kept)),
        "n_control_wells": int((kept["pert_type"] == NEGCON).sum()),
        "n_wells_unknown_perturbation": int(unknown.sum()),
        "n_wells_empty": int((empty & ~unknown).sum()),
        "n_fields": int(len(fields_meta)),
        "negatives": negatives,
        "plates_normalised_against_all_wells": sorted(p for p, r in reference.items() if r == "all wells"),
        "null_size": null_size,
        "threshold": threshold,
    }
    return {"summary": summary, "perturbations": maps, "wells": kept}
