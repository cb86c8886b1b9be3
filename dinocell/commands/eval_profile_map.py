"""`dinocell eval profile-map`: per-well profiles, plate normalisation, replicate-retrieval mAP (JUMP protocol)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dinocell.commands.boundary import command
from dinocell.commands.eval_setup import Inputs, add_feature_option, add_model_options, add_run_options
from dinocell.eval.report import format_table, write_results

PROG = "dinocell eval profile-map"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Phenotypic activity as the JUMP consortium measures it: field features -> per-well profiles (median "
            "over the fields) -> robust z-score per plate against the negative-control wells (all wells on plates "
            "without controls) -> for each perturbation, the mean average precision (mAP, copairs, cosine) with "
            "which its replicate wells retrieve each other against the negative controls (against all other "
            "perturbations when there are no controls), a permutation p-value, Benjamini-Hochberg corrected; "
            "fraction retrieved = share of perturbations with corrected p < --threshold. Perturbations come from "
            "--metadata tables or from the samples' own meta (SyntheticCellPainting)."
        ),
        epilog=(
            "examples:\n"
            "  dinocell eval profile-map --input feats/jump --metadata well.csv.gz \\\n"
            "      --controls perturbation_control.csv --plates plate.csv.gz --plate-types COMPOUND \\\n"
            "      --output-dir results/map\n"
            "  dinocell eval profile-map --config-file output/demo/config.yaml \\\n"
            "      --checkpoint output/demo/eval/final/teacher_checkpoint.pth \\\n"
            "      --input SyntheticCellPainting:split=test:size=400:image_size=96:cell_radius=12:plate_format=96 \\\n"
            "      --output-dir output/demo/map\n"
            "metadata: JUMP's tables from github.com/jump-cellpainting/datasets (metadata/), or any CSV with plate, "
            "well and perturbation columns (Metadata_ prefix optional). Tables (CSV, .csv.gz, parquet) may be local "
            "files or s3:// / https:// URLs."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--input", required=True, metavar="DIR|DATASET",
        help="field features from `dinocell eval features`, or a dataset string with plate and well in its meta")
    add("--metadata", action="append", default=[], metavar="CSV",
        help="table of plate, well, perturbation (JUMP well.csv.gz); repeatable")
    add("--controls", metavar="CSV", help="perturbation -> pert_type table (JUMP perturbation_control.csv)")
    add("--plates", metavar="CSV", help="plate -> plate type table (JUMP plate.csv.gz), with --plate-types")
    add("--plate-types", nargs="+", default=[], metavar="TYPE", help="keep plates of these types, e.g. COMPOUND")
    add("--negcon", nargs="+", default=[], metavar="ID", help="perturbations that are negative controls, e.g. "
        "JCP2022_033924 (DMSO); adds to the controls found in the tables")
    add("--perturbation-column", metavar="NAME", help="the perturbation column of --metadata tables, when its "
        "name is none of Metadata_JCP2022, Metadata_perturbation, perturbation")
    add("--null-size", type=int, default=10000, metavar="N", help="permutations of the p-value null (10000)")
    add("--threshold", type=float, default=0.05, metavar="P", help="corrected p-value threshold (0.05)")
    add_feature_option(parser)
    add_run_options(parser)
    add_model_options(parser)
    return parser


def tables(summary: dict, maps: list[dict]) -> str:
    rows = [[key, value] for key, value in summary.items() if not isinstance(value, list)]
    text = format_table(["", "value"], rows)
    per = [[m["perturbation"], m["n_wells"], m["mean_average_precision"], m["p_value"], m["corrected_p_value"],
            m["below_corrected_p"]] for m in maps]
    return text + "\n\nper perturbation\n" + format_table(
        ["perturbation", "wells", "mAP", "p", "corrected p", "retrieved"], per)


@command(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import pandas as pd

    from dinocell.eval.profile_map import profile_map, read_table

    inputs = Inputs(args, tuple(args.features.split("+")))
    fields = inputs.features(args.input, "input")
    result = profile_map(
        fields.matrix(args.features), pd.DataFrame(fields.meta),
        metadata=[read_table(p) for p in args.metadata],
        controls=read_table(args.controls) if args.controls else None,
        plates=read_table(args.plates) if args.plates else None,
        plate_types=args.plate_types, negcon=args.negcon, perturbation_column=args.perturbation_column,
        null_size=args.null_size, threshold=args.threshold, seed=args.seed,
    )
    summary = {**result["summary"], "bad_samples_skipped": fields.bad_counts()["total"],
               "features": args.features}
    maps = result["perturbations"].to_dict(orient="records")
    out = Path(args.output_dir)
    write_results(out, "profile-map", {"summary": summary, "perturbations": maps, **inputs.description()},
                  tables(summary, maps))
    result["wells"].to_csv(out / "profile-map-wells.csv", index=False)
    print(format_table(["", "value"], [[k, v] for k, v in summary.items() if not isinstance(v, list)]))
    print(f"results: {out}/profile-map.json, profile-map.txt (per perturbation), profile-map-wells.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
