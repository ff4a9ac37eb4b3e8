"""The ``appliance`` command: one sub-command per operation, thin over the packages."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from appliance import __version__, config
from appliance.errors import ApplianceError, DiskLow, NothingUsable
from appliance.store.datadir import DataDirectory

log = logging.getLogger("appliance")

EXAMPLES = {
    "analyze": "examples:\n  appliance analyze /media/usb/DICOM\n  appliance analyze study.zip --json",
    "status": "examples:\n  appliance status\n  appliance status --json",
    "synth": ("examples:\n  appliance synth --out /tmp/chest --slices 300 --region chest\n"
              "  appliance synth --out /tmp/tilted --slices 120 --tilt 15 --transfer-syntax jpeg2000\n"
              "  appliance synth --out /tmp/lesion --slices 200 --region abdomen --lesion pancreas-hypo"),
    "serve": "examples:\n  APPLIANCE_HOME=/var/lib/appliance appliance serve",
    "export": "examples:\n  appliance export                       # last month, into export_dir\n"
              "  appliance export --month 2026-10 --out /media/usb",
    "hub": "examples:\n  appliance hub init --hub /srv/hub\n  appliance hub add-site BASE64KEY --name 'Clinic A'\n"
           "  appliance hub import /media/usb/*.ctx\n  appliance hub report --out /srv/hub/report\n"
           "  appliance hub import --db postgresql://hub@db/screening bundle.ctx\n"
           "  appliance hub fhir --month 2026-05 --out /srv/hub/fhir/2026-05.json",
    "users": "examples:\n  appliance users add amina --role technician   (asks for the password)\n"
             "  echo \"$PASSWORD\" | appliance users add admin --role admin\n  appliance users list",
    "settings": "examples:\n  appliance settings",
    "import": ("examples:\n  appliance import /media/usb\n"
               "  appliance import --usb /dev/sdb1   (as root: mounts read-only)"),
    "install-systemd": ("examples:\n  appliance install-systemd /tmp/units   # look before installing\n"
                        "  sudo appliance install-systemd --install --user appliance --home /var/lib/appliance"),
    "dicom": ("examples:\n  APPLIANCE_DICOM_ALLOWED_CALLERS='CT01@192.168.1.20' appliance dicom\n"
              "  /usr/bin/echoscu -aec APPLIANCE 127.0.0.1 11112"),
    "evaluate": ("examples:\n  appliance evaluate --model chest-covid19 /media/usb/site-cases --json\n"
                 "  appliance evaluate --model chest-covid19 labels.csv --sensitivity 0.95 --record"),
    "build-engines": "examples:\n  appliance build-engines\n  python build_engines.py",
    "packs": ("examples:\n  appliance packs trust /media/usb/partner.pub\n"
              "  appliance packs import /media/usb/chest-covid19-2.0.0.tar.gz\n"
              "  appliance packs import /media/usb/chest-covid19/\n  appliance packs list --json"),
    "doctor": "examples:\n  appliance doctor\n  appliance doctor --json",
    "update": ("examples:\n  appliance update /media/usb/appliance-0.2.0-linux-x86_64.tar.gz\n"
               "  appliance update bundle.tar.gz --prefix /opt/appliance --data /var/lib/appliance --allow-downgrade"),
    "rollback": "examples:\n  appliance rollback\n  appliance rollback --prefix /opt/appliance --force",
    "https": ("examples:\n  appliance https setup --out /tmp/https      # look before installing\n"
              "  sudo APPLIANCE_HOME=/var/lib/appliance appliance https setup --install --hostname ct.clinic.example\n"
              "  sudo APPLIANCE_HOME=/var/lib/appliance appliance https setup --install --cert ct.pem --key ct.key\n"
              "  appliance https ca > site-ca.pem          # for the radiologists' computers to trust\n"
              "  appliance https show"),
    "purge": "examples:\n  appliance purge --dry-run   # what would go now\n  appliance purge --json",
    "backup": ("examples:\n  appliance backup --out /media/usb\n  appliance backup --out /media/usb --instances\n"
               "  appliance backup --show-key      # the recovery code to write down, once"),
    "restore": ("examples:\n  appliance restore /media/usb/site-1a2b-backup-20270101T020000Z.ctb "
                "--home /var/lib/appliance\n  appliance restore BACKUP --key 'ABCD-EFGH-...' --expect-site 1a2b:..."),
    "batch": ("examples:\n  appliance batch screen /mnt/archive --out /srv/screening/2026\n"
              "  appliance batch screen /mnt/archive --out /srv/screening/2026 --resume --workers 4\n"
              "  appliance batch screen /shared/archive --out /shared/screening --ray auto   (needs appliance[scale])"),
}


def _setup_logging(settings: config.Settings) -> None:
    logging.basicConfig(level=getattr(logging, str(settings.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("fontTools").setLevel(logging.WARNING)  # font subsetting for each PDF report is not news


def _print_summary(doc: dict[str, Any]) -> None:
    imp = doc["import"]
    print(f"Imported {imp['stored']} new image(s), {imp['duplicates']} already stored, "
          f"{len(imp['quarantined'])} quarantined.")
    for q in imp["quarantined"][:20]:
        print(f"  quarantined {q['file']}: {q['reason_code']} - {q['reason']}")
    for study in doc["studies"]:
        print(f"Study {study['study_instance_uid']}")
        for s in study["series"]:
            if s["status"] == "rejected":
                print(f"  Series {s['series_instance_uid']}: REJECTED {s['reason_code']} - {s['reason']}")
                continue
            z, y, x = s["shape_zyx"]
            dz, dy, dx = s["spacing_mm_zyx"]
            print(f"  Series {s['series_instance_uid']}: {s['slices']} slices -> {z}x{y}x{x} voxels "
                  f"at {dz:.2f} x {dy:.2f} x {dx:.2f} mm ({s['seconds']['total']:.1f} s)")
            for p in s["problems"]:
                print(f"    note {p['reason_code']}: {p['reason']}")
            for r in s["results"]:
                flag = "FLAGGED" if r["flagged"] else "ok"
                print(f"    {r['model']} {r['model_version']}: score {r['score']} [{flag}]")
                for f in r["findings"]:
                    if "volume_ml" in f:
                        print(f"      {f['name']}: {f['volume_ml']:.0f} mL")
                if not r["validated"]:
                    print(f"      NOT VALIDATED: {r.get('notice') or 'research use only'}")
            for skipped in s.get("skipped_models", []):
                print(f"    {skipped['model']}: not run - {skipped['why']}")


def cmd_analyze(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance.jobs.intake import analyze_paths

    missing = [p for p in args.paths if not p.exists()]
    if missing:
        print(f"error: {missing[0]} does not exist", file=sys.stderr)
        return 2
    try:
        doc = analyze_paths(args.paths, settings)
    except NothingUsable as exc:
        print(f"error: NOTHING_USABLE: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        _print_summary(doc)
    analyzed = any(s["status"] == "analyzed" for st in doc["studies"] for s in st["series"])
    if not analyzed:
        codes = sorted({s["reason_code"] for st in doc["studies"] for s in st["series"]})
        print(f"error: no series could be analysed ({', '.join(codes)})", file=sys.stderr)
        return 1
    return 0


def cmd_status(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance.store.database import counts, open_database

    doc = {"home": str(settings.home_path), **counts(open_database(settings.home_path))}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        for key, value in doc.items():
            print(f"{key:>18}: {value}")
    return 0


def cmd_synth(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance.synth.writer import SynthOptions, write_series

    opts = SynthOptions(slices=args.slices, size=args.size, region=args.region, lesions=tuple(args.lesion),
                        tilt_deg=args.tilt, missing_slices=args.missing_slices,
                        transfer_syntax=args.transfer_syntax, seed=args.seed)
    truth = write_series(args.out, opts)
    print(f"wrote {opts.slices - opts.missing_slices} slices of a synthetic {opts.region} CT to {args.out} "
          f"(series {truth['series_instance_uid']}, {len(truth['lesions'])} lesion(s))")
    return 0


def cmd_build_engines(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance.calibration import build_all

    records = build_all(settings)
    if not records:
        print(f"no model packs in {settings.engines_path}: nothing to build")
    for record in records:
        for r in record["parity"]["results"]:
            state = "enabled" if r["enabled"] else "NOT enabled"
            speed = f", {r['speedup']:.2f}x FP32" if r.get("speedup") else ""
            print(f"{record['model']}: {r['backend']} {r['precision']} {state} ({r['why']}{speed})")
        for s in record["parity"]["skipped"]:
            print(f"{record['model']}: {s['backend']} {s['precision']} engine skipped: {s['why']}")
    from appliance.inference.packs import load_packs

    refused = len(load_packs(settings.engines_path)[1])
    return 1 if refused else 0


def cmd_evaluate(args: argparse.Namespace, settings: config.Settings) -> int:
    import getpass

    from appliance.evaluate import evaluate, record_operating_point

    doc = evaluate(args.model, args.data, settings, args.sensitivity)
    if args.record:
        record_operating_point(settings, doc, args.actor or getpass.getuser())
        doc["recorded"] = True
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    m = doc["metrics"]

    def line(name: str, metric: dict) -> str:
        lo, hi = metric["ci95"]
        return f"  {name:12} {metric['value']:.3f}  (95% CI {lo:.3f}-{hi:.3f})"

    print(f"{doc['model']} {doc['model_version']} on {doc['cases']} cases ({doc['positives']} positive), "
          f"{doc['backend']} {doc['precision']}, "
          f"threshold {doc['threshold']['value']:.4f} ({doc['threshold']['source']})")
    for key in ("sensitivity", "specificity", "accuracy", "f1", "auc"):
        print(line(key, m[key]))
    fs = doc["for_sensitivity"]
    print(f"  threshold for sensitivity {fs['target']:.2f}: {fs['threshold']:.4f} "
          f"(specificity there {fs['metrics']['specificity']['value']:.3f})" + (" - recorded" if args.record else ""))
    for s in doc["skipped"][:10]:
        print(f"  skipped {s['case']}: {s['why']}")
    if not doc["validated"]:
        print(f"NOT VALIDATED: {doc['notice']}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def cmd_dicom(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance.ingest import dicom_server
    from appliance.store.instances import open_store

    open_store(settings)  # migrate, and recover from a crash if no other writer is alive
    print(f"DICOM receiver {settings.dicom_ae_title} on {settings.dicom_bind_address}:{settings.dicom_port}; "
          f"allowed callers: {settings.dicom_allowed_callers}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # systemd stops with SIGTERM: stop as on Ctrl-C, audit flushed
    try:
        dicom_server.start(settings, block=True)
    except KeyboardInterrupt:
        print("stopped")
    return 0


def cmd_import(args: argparse.Namespace, settings: config.Settings) -> int:
    """Import a folder, files, zip archives or a USB medium; queue every series it touched for analysis."""
    if args.usb:
        from appliance.ingest.usb import import_device

        return import_device(args.usb, settings.home_path)
    from appliance.ingest.importer import ImportSummary
    from appliance.jobs.intake import import_and_queue
    from appliance.store import imports
    from appliance.store.instances import open_store

    store = open_store(settings)
    import_id = imports.start(store.db, args.source, getpass.getuser())
    latest = [ImportSummary()]

    def progress(summary) -> None:
        latest[0] = summary
        done = summary.stored + summary.duplicates + len(summary.quarantined) + summary.skipped
        if done % 100 == 0:
            print(f"  {done} files read ...", flush=True)
            imports.update(store.db, import_id, summary)

    try:
        summary = import_and_queue(store, args.paths, settings, source=args.source, progress=progress).summary
    except DiskLow:
        imports.finish(store.db, import_id, latest[0], state="failed")  # main() prints the one line
        raise
    imports.finish(store.db, import_id, summary)
    doc = {**summary.as_dict(), "queued_series": len(summary.series)}
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"Imported {summary.stored} new image(s), {summary.duplicates} already stored, "
              f"{len(summary.quarantined)} quarantined; {len(summary.series)} series queued for analysis.")
        for q in summary.quarantined[:50]:
            print(f"  quarantined {q['file']}: {q['reason_code']} - {q['reason']}")
    return 0 if summary.series or not summary.quarantined else 1


def cmd_install_systemd(args: argparse.Namespace, settings: config.Settings) -> int:
    import shutil
    import subprocess  # nosec B404 - systemctl and udevadm, fixed arguments, only with --install

    from appliance import systemd_units

    if args.install == (args.dir is not None):
        print("give a folder to write the units into, or --install to write them into "
              f"{systemd_units.SYSTEM_UNITS} and reload systemd", file=sys.stderr)
        return 2
    dest = systemd_units.SYSTEM_UNITS if args.install else args.dir
    for path in systemd_units.install(dest, user=args.user, home=args.home, venv=args.venv,
                                      engines=settings.engines_path):
        print(f"wrote {path}")
    enable = " ".join(systemd_units.units_to_enable())
    if args.install:
        for command in (["systemctl", "daemon-reload"], ["udevadm", "control", "--reload"]):
            if shutil.which(command[0]):
                subprocess.run(command, check=False)  # nosec B603
        print(f"then: systemctl enable --now {enable}")
    else:
        print(f"to install them: appliance install-systemd --install (or copy them into {systemd_units.SYSTEM_UNITS} "
              f"and the udev rule into /etc/udev/rules.d), then: systemctl enable --now {enable}")
    return 0


def cmd_settings(args: argparse.Namespace, settings: config.Settings) -> int:
    if args.markdown:
        print(config.markdown_table(), end="")
        return 0
    for s in config.SETTINGS:
        print(f"{s.name} = {settings.values[s.name]!r}  ({s.env_var}; default {s.default!r})\n    {s.help}")
    return 0


def cmd_worker(args: argparse.Namespace, settings: config.Settings) -> int:
    import threading

    from appliance.jobs.worker import Worker

    worker = Worker(settings)
    print(f"worker running on {settings.home_path} (quiet period {settings.quiet_period_seconds:.0f} s)", flush=True)
    if args.once:
        try:
            while worker.run_once():
                pass
        finally:
            worker.runner.close()
        return 0
    try:
        worker.run(threading.Event())
    except KeyboardInterrupt:
        print("stopped")
    return 0


def cmd_serve(args: argparse.Namespace, settings: config.Settings) -> int:
    """The receiver, worker, web UI and ``incoming/`` drop folder together (see :mod:`appliance.serve`)."""
    from appliance import serve

    if args.once:
        serve.serve_once(settings)
    else:
        serve.serve(settings, args.poll_seconds)
    return 0


def cmd_web(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance.serve import run_web

    try:
        run_web(settings)
    except KeyboardInterrupt:
        print("stopped")
    return 0


def cmd_users(args: argparse.Namespace, settings: config.Settings) -> int:
    """``users add NAME --role R`` (password from standard input), ``users list``."""
    from appliance.store import users
    from appliance.store.database import open_database

    db = open_database(settings.home_path)
    if args.action == "list":
        for row in db.query("SELECT username, role, disabled, created_at FROM users ORDER BY username"):
            state = "disabled" if row["disabled"] else "enabled"
            print(f"{row['username']}\t{row['role']}\t{state}\t{row['created_at']}")
        return 0
    if not args.name or not args.role:
        print("error: users add needs NAME and --role", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        users.add_user(db, args.name, password, args.role, actor=f"shell:{getpass.getuser()}")
    except users.AccountError as exc:
        print(f"error: ACCOUNT: {exc}", file=sys.stderr)
        return 1
    print(f"user {args.name} ({args.role}) added")
    return 0


def cmd_keys(args: argparse.Namespace, settings: config.Settings) -> int:
    """``keys init``: the site's signing key and pseudonym secret; ``keys show``: the public key to register."""
    from appliance.export import keys

    home = settings.home_path
    public = keys.init_site_keys(home) if args.action == "init" else keys.site_public_key(home)
    if public is None:
        print("error: NO_SITE_KEY: run `appliance keys init` first", file=sys.stderr)
        return 1
    print(f"site signing key fingerprint: {keys.fingerprint(public)}")
    print(f"public key (give it to the hub: appliance hub add-site KEY --name NAME): {keys.encode_public(public)}")
    return 0


def cmd_export(args: argparse.Namespace, settings: config.Settings) -> int:
    """Write a month's de-identified, signed, encrypted bundle; say when the medium may be removed."""
    from appliance.export import run

    month = args.month or run.previous_month()
    out = args.out or (Path(settings.export_dir) if settings.export_dir else DataDirectory(settings.home_path).exports)
    result = run.export_month(settings, month, out, images=args.images or settings.export_images)
    if result.reused:
        print(f"{month}: nothing changed since {result.path.name} (revision {result.revision}); it stands.")
    else:
        print(f"{month}: wrote {result.path} (revision {result.revision}, {result.studies} studies, "
              f"{result.results} results, {result.images} images), sha256 {result.sha256}")
    os.sync()  # flush the medium before saying it may be pulled out
    print(f"verified; SAFE TO REMOVE the medium holding {result.path.parent}", flush=True)
    return 0


def _hub_dir(args: argparse.Namespace) -> Path:
    return Path(args.hub or os.environ.get("APPLIANCE_HUB_HOME", "./hub"))


def _hub_db(args: argparse.Namespace):
    from appliance.hub.store import HubDB, default_url

    return HubDB(args.db or os.environ.get("APPLIANCE_HUB_DB") or default_url(_hub_dir(args)))


def cmd_hub(args: argparse.Namespace, settings: config.Settings) -> int:
    """The programme hub: init, add-site, import, report."""
    from appliance.export import keys
    from appliance.export.bundle import BundleRefused
    from appliance.hub import merge, report

    hub_dir = _hub_dir(args)
    if args.action == "init":
        public = keys.init_hub_keys(hub_dir)
        _hub_db(args).close()
        print(f"hub key fingerprint: {keys.fingerprint(public)}")
        print(f"hub public key (set hub_public_key on every site to it): {keys.encode_public(public)}")
        return 0
    db = _hub_db(args)
    try:
        if args.action == "add-site":
            if len(args.items) != 1 or not args.name:
                print("error: hub add-site needs one PUBKEY and --name", file=sys.stderr)
                return 2
            print(f"registered {merge.add_site(db, args.items[0], args.name, args.site_id)}")
            return 0
        if args.action == "report":
            for path in report.write_report(db, args.out or hub_dir / "report"):
                print(path)
            return 0
        if args.action == "fhir":
            from appliance.hub import fhir

            if not args.month:
                print("error: hub fhir needs --month YYYY-MM", file=sys.stderr)
                return 2
            out = args.out or hub_dir / "fhir" / f"{args.month}.fhir.json"
            print(f"{out}: FHIR R4 Bundle, {fhir.write_month(db, args.month, out)} entries, validated")
            return 0
        refused = 0
        for item in args.items:
            try:
                doc = merge.import_bundle(db, hub_dir, Path(item))
            except BundleRefused as exc:
                refused += 1
                print(f"refused {item}: {exc.reason_code}: {exc.reason}")
            except OSError as exc:
                refused += 1
                print(f"refused {item}: UNREADABLE: {exc}")
            else:
                print(f"merged {item}: {doc['site_id']} {doc['month']} revision {doc['revision']}, "
                      f"{doc['results']} results{' (supersedes the earlier revision)' if doc['superseded'] else ''}")
        return 1 if refused else 0
    finally:
        db.close()


def _packs_trust(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance import signing
    from appliance.inference import trust
    from appliance.store.database import audit, open_database

    try:
        key = trust.trust_key(settings.home_path, args.path)
    except (signing.SignatureProblem, OSError) as exc:
        print(f"refused {args.path}: {getattr(exc, 'reason_code', 'UNREADABLE')}: {exc}", file=sys.stderr)
        return 1
    audit(open_database(settings.home_path), getpass.getuser(), "pack_key_trusted", key.fingerprint,
          source=str(args.path))
    print(f"trusted key {key.fingerprint}: model packs it signs can now be imported (appliance packs import PATH)")
    return 0


def _packs_import(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance.inference import pack_import
    from appliance.inference.packs import PackRefused
    from appliance.store.database import audit, open_database

    db = open_database(settings.home_path)
    try:
        done = pack_import.import_pack(args.path, settings.home_path, settings.engines_path)
    except PackRefused as exc:
        audit(db, getpass.getuser(), "pack_refused", str(args.path), reason_code=exc.reason_code, reason=exc.reason)
        print(f"refused {args.path}: {exc.reason_code}: {exc.reason}", file=sys.stderr)
        return 1
    pack = done.pack
    if not done.already:
        audit(db, getpass.getuser(), "pack_imported", pack.id, version=pack.version, signer=done.signer,
              fingerprint=done.fingerprint, source=str(args.path), model_sha256=pack.model_sha256)
    state = "was already installed (identical)" if done.already else f"installed in {pack.path}"
    print(f"{pack.id} {pack.version} signed by {done.signer} ({done.fingerprint}) {state}")
    if pack.kind == "classifier":
        print(f"it stays OFF until evaluated here: appliance evaluate --model {pack.id} DATA --record, "
              "then switch it on in Admin -> Model packs and engines")
    else:
        print("a measurement: used from the next analysis (run appliance build-engines for its INT8 model)")
    return 0


def _packs_list(args: argparse.Namespace, settings: config.Settings) -> int:
    from appliance.inference.registry import pack_list
    from appliance.store.database import open_database

    rows = pack_list(settings, open_database(settings.home_path))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        validated = "validated" if r["validated"] else "not validated"
        print(f"{r['id']} {r['version']} ({r['kind']}, {r['origin']}{', in use' if r['in_use'] else ''}): "
              f"{validated}; {r['enabled']}; signer: {r['signer']}\n    {r['path']}")
    return 1 if any(r["signature_problem"] for r in rows) else 0


def cmd_packs(args: argparse.Namespace, settings: config.Settings) -> int:
    """``packs trust KEYFILE``, ``packs import PATH``, ``packs list [--json]``."""
    if args.action != "list" and args.path is None:
        print(f"error: packs {args.action} needs a PATH", file=sys.stderr)
        return 2
    return {"trust": _packs_trust, "import": _packs_import, "list": _packs_list}[args.action](args, settings)


def cmd_doctor(args: argparse.Namespace, settings: config.Settings) -> int:
    """Check everything a technician can be asked about over the phone; exit 1 when something must be fixed."""
    from appliance import doctor

    report = doctor.run_checks(settings)
    print(json.dumps(report, indent=2) if args.json else doctor.as_text(report, settings))
    return 0 if report["ok"] else 1
def cmd_update(args: argparse.Namespace, settings: config.Settings) -> int:
    """Install a signed bundle beside the current version, switch to it, and switch back if its check fails."""
    from appliance import release

    if not args.bundle.is_file():
        print(f"error: NOT_A_BUNDLE: {args.bundle} is not a file", file=sys.stderr)
        return 2
    doc = release.update(args.bundle, args.prefix, args.data, args.allow_downgrade)
    print(f"updated {doc['previous']} -> {doc['version']}; database backup: {doc['backup'] or 'none (no database)'}")
    if doc["carried_packs"]:
        print(f"model packs the site added, kept: {', '.join(doc['carried_packs'])}")
    print(doc["restart"])
    print("`appliance rollback` returns to the previous version and this backup")
    return 0


def cmd_rollback(args: argparse.Namespace, settings: config.Settings) -> int:
    """Return to the version before the last update, with the database as it was before that update."""
    from appliance import release

    doc = release.rollback(args.prefix, args.data, args.force)
    print(f"rolled back {doc['previous']} -> {doc['version']}; database restored from "
          f"{doc['restored'] or 'nothing (there was no database)'}")
    if doc["studies_dropped"]:
        print(f"{len(doc['studies_dropped'])} studies that arrived after the backup are no longer in the database; "
              "their files are still under the data directory's instances/ folder: import them again")
    if doc["problem"]:
        print(f"warning: the check of {doc['version']} failed: {doc['problem']}")
    print(doc["restart"])
    return 1 if doc["problem"] else 0


def _https_certificate(args: argparse.Namespace, settings: config.Settings):
    from appliance import https

    if args.cert or args.key:
        if not (args.cert and args.key):
            raise https.CertificateRefused("USAGE", "--cert and --key go together")
        return https.own_certificate(settings.home_path, args.cert, args.key)
    return https.site_certificate(settings.home_path, args.hostname or https.default_names(), settings.site_name)


def _https_setup(args: argparse.Namespace, settings: config.Settings) -> int:
    import shutil
    import subprocess  # nosec B404 - systemctl with fixed arguments, only with --install

    from appliance import https

    if args.install == (args.out is not None):
        print(f"give --out DIR to write the proxy's files for review, or --install to write them into "
              f"{https.SYSTEM_CONFIG.parent} and {https.SYSTEM_UNIT.parent}", file=sys.stderr)
        return 2
    try:
        cert = _https_certificate(args, settings)
    except https.CertificateRefused as exc:
        print(f"refused: {exc.reason_code}: {exc.reason}", file=sys.stderr)
        return 1
    https.give_to_owner(settings.home_path)
    state = "new" if cert.issued else "kept"
    print(f"server certificate ({state}) for {', '.join(cert.names)}, valid until {cert.not_after:%Y-%m-%d}, "
          f"issued by {cert.issuer}")
    opts = https.ProxyOptions(https.TLSFiles.of(settings.home_path), settings.web_port, settings.max_upload_bytes,
                              port=args.port, http_port=args.http_port, listen_address=args.listen)
    try:
        written = https.write_proxy(None if args.install else args.out, opts, user=args.user, home=settings.home_path)
    except OSError as exc:
        print(f"error: cannot write {exc.filename}: {exc.strerror}" + (" (--install needs root)" if args.install
                                                                      else ""), file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    changes = {"web_secure_cookies": True, "web_behind_proxy": True}
    if not args.install:
        print(f"to install: appliance https setup --install (it also sets {', '.join(f'{k} = true' for k in changes)}"
              f" in {config.config_path(settings.home_path)} and restarts appliance-web)")
        return 0
    https.give_to_owner(settings.home_path, config.save_overrides(changes, config.config_path(settings.home_path)))
    print(f"set {', '.join(f'{k} = true' for k in changes)} in {config.config_path(settings.home_path)}")
    if shutil.which("systemctl"):
        for command in (["systemctl", "daemon-reload"], ["systemctl", "try-restart", "appliance-web.service"],
                        ["systemctl", "try-reload-or-restart", https.UNIT_NAME]):
            subprocess.run(command, check=False)  # nosec B603
    print(f"then: systemctl disable --now nginx.service; systemctl enable --now {https.UNIT_NAME}")
    return 0


def cmd_https(args: argparse.Namespace, settings: config.Settings) -> int:
    """``https setup``: certificate, nginx config and unit; ``https ca``: the site CA (PEM); ``https show``."""
    from appliance import https

    if args.action == "setup":
        return _https_setup(args, settings)
    files = https.TLSFiles.of(settings.home_path)
    if args.action == "ca":
        pem = https.site_ca_pem(settings.home_path)
        if pem is None:
            print("error: NO_SITE_CA: run `appliance https setup` first (or the site uses its own certificate)",
                  file=sys.stderr)
            return 1
        sys.stdout.write(pem.decode())
        return 0
    left = https.days_left(files.certificate)
    if left is None:
        print("no server certificate: run `appliance https setup`")
        return 1
    print(f"server certificate {files.certificate}: {left} days left "
          f"(renew with `appliance https setup --install` within {https.RENEW_WITHIN_DAYS} days of expiry)")
    print(f"web_behind_proxy = {settings.web_behind_proxy}, web_secure_cookies = {settings.web_secure_cookies}")
    return 0 if left > 0 else 1


def cmd_purge(args: argparse.Namespace, settings: config.Settings) -> int:
    """Remove the images retention allows while free space is below the purge target (see store.retention)."""
    from appliance.jobs.purge import run_purge
    from appliance.store.instances import open_store
    from appliance.store.retention import MIB

    store = open_store(settings)  # hold the writer lock: recovery never runs beside a purge
    report = run_purge(store.db, settings, dry_run=args.dry_run, actor=getpass.getuser())
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    verb = "would purge" if args.dry_run else "purged"
    print(f"free space {report.free_before // MIB} MiB, purge target {report.target // MIB} MiB: {verb} "
          f"{len(report.purged)} series ({report.bytes_freed // MIB} MiB); "
          f"free space now {report.free_after // MIB} MiB")
    for c in report.purged[:50]:
        print(f"  {c.series_instance_uid} ({c.instances} images, eligible since {c.eligible_since[:10]})")
    if report.skipped_reason:
        print(report.skipped_reason)
    return 0


def cmd_backup(args: argparse.Namespace, settings: config.Settings) -> int:
    """Write an encrypted, signed backup, read it back and verify it; say when the medium may be removed."""
    from appliance import backup
    from appliance.export import keys

    home = settings.home_path
    if args.show_key:
        keys.init_site_keys(home)
        code = backup.recovery_code(backup.backup_key(home, create=True))
        print("backup recovery code (write it down once and keep it away from this box: without it a backup "
              f"cannot be restored onto a new disk):\n  {code}")
        return 0
    out = args.out or (Path(settings.backup_dir) if settings.backup_dir else None)
    if out is None:
        print("error: NO_BACKUP_DIR: give --out DIR or set backup_dir (e.g. a USB disk's mount point)", file=sys.stderr)
        return 1
    first = not (DataDirectory(home).keys / backup.BACKUP_KEY).is_file()
    try:
        result = backup.write_backup(settings, out, instances=args.instances or settings.backup_instances)
    except backup.BackupRefused as exc:
        print(f"error: {exc.reason_code}: {exc.reason}", file=sys.stderr)
        return 1
    removed = backup.rotate(out, result.site_id, settings.backup_keep)
    what = "database, keys, settings, artefacts" + (" and images" if result.instances else "")
    print(f"wrote {result.path} ({what}; {result.files} files, {result.size_bytes / 2**20:.1f} MiB), "
          f"sha256 {result.sha256}")
    for path in removed:
        print(f"removed the older backup {path.name} (backup_keep = {settings.backup_keep})")
    if first:
        print("a backup key was made for this site: run `appliance backup --show-key` now and write its recovery "
              "code down; restoring needs it")
    os.sync()
    print(f"read back and verified; SAFE TO REMOVE the medium holding {result.path.parent}", flush=True)
    return 0


def _restore_key(args: argparse.Namespace) -> bytes:
    from appliance import backup

    if args.key_file:
        data = args.key_file.read_bytes()
        return data if len(data) == 32 else backup.parse_recovery_code(data.decode(errors="replace"))
    code = args.key or os.environ.get("APPLIANCE_BACKUP_KEY") or getpass.getpass("backup recovery code: ")
    return backup.parse_recovery_code(code)


def cmd_restore(args: argparse.Namespace, settings: config.Settings) -> int:
    """Restore a backup into a new, empty data directory; a tampered or foreign backup is refused whole."""
    from appliance import backup, signing

    home = (args.home or settings.home_path).resolve()
    try:
        manifest = backup.restore(args.backup, home, _restore_key(args), expect_fingerprint=args.expect_site)
    except (backup.BackupRefused, signing.SignatureProblem) as exc:
        print(f"refused {args.backup}: {exc.reason_code}: {exc.reason}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"refused {args.backup}: UNREADABLE: {exc}", file=sys.stderr)
        return 1
    held = manifest["counts"]
    print(f"restored the backup of {manifest['site_id']} made {manifest['created_at']} into {home}: "
          f"{held['studies']} studies, {held['results']} results, {held['instances']} images"
          f"{'' if manifest['instances'] else ' (images were not in this backup)'}")
    print(f"start the services with APPLIANCE_HOME={home}")
    return 0


def cmd_batch(args: argparse.Namespace, settings: config.Settings) -> int:
    """``batch screen SOURCE --out DIR``: screen every series of an archive; exit 1 when none was analysed."""
    from appliance.batch.screen import BatchOptions, screen_archive

    if not args.source.exists():
        print(f"error: {args.source} does not exist", file=sys.stderr)
        return 2
    options = BatchOptions(workers=args.workers, ray=args.ray, resume=args.resume, retries=args.retries,
                           series_timeout=args.series_timeout, gpus_per_task=args.gpus_per_task)
    with _batch_progress(not args.json) as progress:
        run = screen_archive(args.source, args.out, settings, options, progress)
    if args.json:
        print(json.dumps(run, indent=2))
    else:
        parquet = "results.parquet" if run["parquet"] else "no Parquet (it needs appliance[scale])"
        print(f"{run['series']} series ({run['skipped']} already screened), {run['refused_files']} file(s) refused, "
              f"{run['series_per_minute']} series/min on {run['runner']}.\n"
              f"Wrote {args.out}/results.csv, {parquet}, summary.html.")
        for key in ("status", "reason_code"):
            print(f"  {key}: " + ", ".join(f"{k} {v}" for k, v in sorted(run["counts"][key].items())))
    return 0 if run["counts"]["status"].get("analyzed") or run["series"] == 0 else 1


@contextlib.contextmanager
def _batch_progress(show: bool) -> Iterator[Callable[[str, int, int], None]]:
    """tqdm bars for the import and the screening, on standard error (none when printing JSON)."""
    from tqdm import tqdm

    bars: dict[str, Any] = {}

    def update(stage: str, done: int, total: int) -> None:
        if show:
            if stage not in bars:
                bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr,
                                   unit="series" if stage == "screen" else "entry")
            bar = bars[stage]
            bar.update(done - bar.n)
            if done >= total:
                bar.close()
    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Offline CT screening appliance.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("analyze", cmd_analyze, "Import DICOM files, folders or zip archives and analyse every series.")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--json", action="store_true", help="print the result document as JSON")
    p = add("status", cmd_status, "Print what the store holds.")
    p.add_argument("--json", action="store_true")
    p = add("synth", cmd_synth, "Write a synthetic CT series (a phantom, not a patient).")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--slices", type=int, default=120)
    p.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    p.add_argument("--region", choices=("chest", "abdomen", "chest-abdomen"), default="chest-abdomen")
    p.add_argument("--lesion", action="append", default=[],
                   choices=("pancreas-hypo", "pancreas-iso", "lung-nodule", "liver-hypo"))
    p.add_argument("--tilt", type=float, default=0.0, help="gantry tilt, degrees")
    p.add_argument("--missing-slices", type=int, default=0)
    p.add_argument("--transfer-syntax", choices=("explicit", "implicit", "rle", "jpeg2000"), default="explicit")
    p.add_argument("--seed", type=int, default=0)
    p = add("worker", cmd_worker, "Run the worker: analyse received series once they are complete.")
    p.add_argument("--once", action="store_true", help="run every job that is ready now, then exit")
    p = add("import", cmd_import, "Import files, folders, zip archives or a USB medium and queue their series.")
    p.add_argument("paths", nargs="*", type=Path, metavar="PATH")
    p.add_argument("--usb", metavar="DEVICE", help="block device to mount read-only and import (as root)")
    p.add_argument("--source", default="import", help="where the files came from, for the audit trail")
    p.add_argument("--json", action="store_true")
    p = add("install-systemd", cmd_install_systemd, "Write the systemd units and udev rule with this box's paths.")
    p.add_argument("dir", type=Path, nargs="?", help="folder to write the units into (nothing else is touched)")
    p.add_argument("--install", action="store_true",
                   help="write them into /etc/systemd/system (udev rule into /etc/udev/rules.d) and reload systemd")
    p.add_argument("--user", default="appliance")
    p.add_argument("--home", type=Path, default=Path("/var/lib/appliance"))
    p.add_argument("--venv", type=Path, default=Path(sys.prefix))
    add("dicom", cmd_dicom, "Run the DICOM receiver (C-ECHO, C-STORE of CT images) in the foreground.")
    p = add("settings", cmd_settings, "List every setting with its value, variable and help.")
    p.add_argument("--markdown", action="store_true", help="print the table of docs/settings.md")
    p = add("evaluate", cmd_evaluate, "Check a model on the site's own labelled cases before relying on it.")
    p.add_argument("--model", required=True)
    p.add_argument("data", type=Path, metavar="DATA", help="folder with one sub-folder per class, or a CSV")
    p.add_argument("--sensitivity", type=float, default=0.9, help="target sensitivity for a suggested threshold")
    p.add_argument("--record", action="store_true", help="record the suggested threshold as the site's operating point")
    p.add_argument("--actor", help="who records it (default: the login name)")
    p.add_argument("--json", action="store_true")
    add("build-engines", cmd_build_engines,
        "Build INT8 models, TensorRT engines (where a GPU and TensorRT exist) and parity reports of every model pack.")
    add("web", cmd_web, "Run the web UI (waitress) in the foreground.")
    p = add("users", cmd_users, "Manage web UI accounts: add NAME --role ROLE (password on standard input), list.")
    p.add_argument("action", choices=("add", "list"))
    p.add_argument("name", nargs="?")
    p.add_argument("--role", choices=("technician", "radiologist", "admin"))
    p = add("keys", cmd_keys, "The site's signing key for exports: init (once) or show its public key.")
    p.add_argument("action", choices=("init", "show"))
    p = add("export", cmd_export, "Write a month's de-identified, signed, encrypted bundle for the programme hub.")
    p.add_argument("--month", help="YYYY-MM (default: last month)")
    p.add_argument("--out", type=Path, help="target folder, e.g. a USB stick (default: the export_dir setting)")
    p.add_argument("--images", choices=("none", "flagged", "all"), help="de-identified key images to include")
    p = add("hub", cmd_hub, "The programme hub: init, add-site PUBKEY --name NAME, import BUNDLE..., report, "
                            "fhir --month M (the merged month as a FHIR R4 Bundle).")
    p.add_argument("action", choices=("init", "add-site", "import", "report", "fhir"))
    p.add_argument("items", nargs="*", metavar="ITEM", help="the site's public key, or bundle files")
    p.add_argument("--hub", help="hub folder (keys, SQLite database, reports; default $APPLIANCE_HUB_HOME or ./hub)")
    p.add_argument("--db", help="database URL: sqlite:///PATH or postgresql://... (default: SQLite in the hub folder)")
    p.add_argument("--name", help="the site's name (add-site)")
    p.add_argument("--site-id", help="the site's id (add-site; default: from its key, as the site derives it)")
    p.add_argument("--out", type=Path, help="report folder (default: HUB/report); fhir: the JSON file "
                                            "(default: HUB/fhir/MONTH.fhir.json)")
    p.add_argument("--month", help="YYYY-MM (fhir)")
    p = add("serve", cmd_serve, "Run the appliance: DICOM receiver, worker, web UI and the incoming drop folder.")
    p.add_argument("--once", action="store_true", help="import the incoming folder once, run every job, and exit")
    p.add_argument("--poll-seconds", type=float, default=2.0)
    p = add("packs", cmd_packs, "Model packs: trust KEYFILE (a partner's public key), import PATH (a signed pack "
                                "folder or .tar.gz), list.")
    p.add_argument("action", choices=("trust", "import", "list"))
    p.add_argument("path", type=Path, nargs="?", metavar="PATH", help="the key file (trust) or the pack (import)")
    p.add_argument("--json", action="store_true", help="list as JSON")
    p = add("doctor", cmd_doctor, "Check the appliance and say what to fix: disk, database, clock, services, "
                                  "ports, PACS, model packs, GPU, export, outbox.")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p = add("update", cmd_update, "Install a signed offline bundle beside this version and switch to it "
                                  "(database backed up; rolled back by itself if the new version fails its check).")
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="appliance-<version>-linux-<arch>.tar.gz")
    p.add_argument("--prefix", type=Path, help="the installation (default: the one this appliance runs from)")
    p.add_argument("--data", type=Path, help="data directory (default: APPLIANCE_HOME, else the one installed)")
    p.add_argument("--allow-downgrade", action="store_true", help="install an older or the same version")
    p = add("rollback", cmd_rollback, "Return to the previous version and the database backup its update took.")
    p.add_argument("--prefix", type=Path, help="the installation (default: the one this appliance runs from)")
    p.add_argument("--data", type=Path, help="data directory (default: APPLIANCE_HOME, else the one installed)")
    p.add_argument("--force", action="store_true",
                   help="roll back even though studies arrived after the backup (their rows leave the database)")
    p = add("https", cmd_https, "Serve the web UI over HTTPS for remote reading: setup (site certificate, nginx "
                                "config and unit), ca (print the site CA to trust), show.")
    p.add_argument("action", choices=("setup", "ca", "show"))
    p.add_argument("--out", type=Path,
                   help="setup: folder to write nginx.conf and the unit into (nothing in /etc is touched)")
    p.add_argument("--install", action="store_true",
                   help="setup: write them into /etc, turn on web_behind_proxy and web_secure_cookies, reload systemd")
    p.add_argument("--hostname", action="append", metavar="NAME",
                   help="setup: a host name or IP address radiologists use (repeat; default: this box's names)")
    p.add_argument("--cert", type=Path, help="setup: the site's own certificate (PEM, chain after it) instead of "
                                             "one from the site CA")
    p.add_argument("--key", type=Path, help="setup: the private key of --cert (PEM, unencrypted)")
    p.add_argument("--port", type=int, default=443, help="setup: HTTPS port (default 443)")
    p.add_argument("--http-port", type=int, default=80, help="setup: plain HTTP port, redirecting only (default 80)")
    p.add_argument("--user", default="appliance", help="setup: the account nginx runs as (owner of the data directory)")
    p.add_argument("--listen", default="", metavar="ADDRESS",
                   help="setup: the one address nginx listens on (default: every address of the box)")
    p = add("purge", cmd_purge, "Remove the images of series analysed, sent and exported more than retention_days "
                                "ago, oldest first, while free space is below purge_free_target_mb.")
    p.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    p.add_argument("--json", action="store_true")
    p = add("backup", cmd_backup, "Write an encrypted, signed backup of the database, keys, settings and artefacts "
                                  "(images with --instances), read it back and verify it.")
    p.add_argument("--out", type=Path, help="target folder, e.g. a USB disk (default: the backup_dir setting)")
    p.add_argument("--instances", action="store_true", help="include the images (instances/)")
    p.add_argument("--show-key", action="store_true", help="print the backup key's recovery code and exit")
    p = add("restore", cmd_restore, "Restore a backup into a new, empty data directory (refuses a tampered or "
                                    "foreign backup, and a data directory that is not empty).")
    p.add_argument("backup", type=Path, metavar="BACKUP", help="the .ctb file")
    p.add_argument("--home", type=Path, help="the data directory to restore into (default: APPLIANCE_HOME)")
    p.add_argument("--key", help="the backup recovery code (default: $APPLIANCE_BACKUP_KEY, else asked for)")
    p.add_argument("--key-file", type=Path, help="a file holding the recovery code, or the old box's keys/backup.key")
    p.add_argument("--expect-site", metavar="FINGERPRINT",
                   help="refuse (FOREIGN) unless the backup was signed by this site key fingerprint")
    p = add("batch", cmd_batch, "Screen an archive: every series under SOURCE (folders, zips), results into DIR.")
    p.add_argument("action", choices=("screen",))
    p.add_argument("source", type=Path, metavar="SOURCE", help="folder tree of DICOM files and zip archives")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="results folder: results.csv, results.parquet, summary.html, the run's data directory")
    p.add_argument("--workers", type=int, default=0, help="local worker processes (default: from CPUs and free memory)")
    p.add_argument("--ray", metavar="ADDRESS", help="run on a Ray cluster: its address, or auto (appliance[scale])")
    p.add_argument("--resume", action="store_true", help="continue a run in DIR, skipping series already screened")
    p.add_argument("--retries", type=int, default=2, help="times a series is tried again after its worker died")
    p.add_argument("--series-timeout", type=float, default=600.0, help="time budget of one series, seconds")
    p.add_argument("--gpus-per-task", type=float, default=0.0, help="GPU share each Ray task asks for (GPU nodes)")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = config.load()
    except config.SettingsError as exc:
        print(f"error: SETTINGS: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings)
    try:
        return int(args.func(args, settings))
    except ApplianceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
