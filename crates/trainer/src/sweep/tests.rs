use super::*;
use clap::Parser;

/// The sweep's arguments as `rattn sweep ARGS` would parse them.
fn args(extra: &[&str]) -> SweepArgs {
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sweep: SweepArgs,
    }
    let mut argv = vec!["rattn-sweep"];
    argv.extend_from_slice(extra);
    Cli::try_parse_from(argv).unwrap().sweep
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

#[test]
fn default_grid_is_the_issue_grid_seed_major() {
    let cells = args(&[]).grid().unwrap().cells();
    // Per seed and stack: 5 windows × {swa, rattention} + full; ablations (relu, nonorm at W 16)
    // in the all-local stack only: (11 + 2) + 11 = 24 per seed, 2 seeds.
    assert_eq!(cells.len(), 48);
    let names: std::collections::HashSet<String> = cells.iter().map(|c| c.dir_name()).collect();
    assert_eq!(names.len(), 48, "directory names must be unique");
    // Stack-major, then seed-major: local seed 0 (13), local seed 1, 3to1 seed 0 (11), 3to1 seed 1.
    let order: Vec<(Stack, u64)> = cells.iter().map(|c| (c.stack, c.seed)).collect();
    let mut want = vec![(Stack::Local, 0); 13];
    want.extend(vec![(Stack::Local, 1); 13]);
    want.extend(vec![(Stack::ThreeToOne, 0); 11]);
    want.extend(vec![(Stack::ThreeToOne, 1); 11]);
    assert_eq!(order, want);
    for stack in [Stack::Local, Stack::ThreeToOne] {
        for v in [Variant::Swa, Variant::Rattention] {
            let ws: Vec<usize> = cells
                .iter()
                .filter(|c| c.seed == 0 && c.stack == stack && c.variant == v)
                .map(|c| c.window.unwrap())
                .collect();
            assert_eq!(ws, [8, 16, 32, 64, 128], "{stack:?} {v:?}");
        }
        let full: Vec<&Cell> = cells
            .iter()
            .filter(|c| c.stack == stack && c.variant == Variant::Full)
            .collect();
        assert_eq!(full.len(), 2);
        assert!(full.iter().all(|c| c.window.is_none()));
    }
    let ablations: Vec<String> = cells
        .iter()
        .filter(|c| matches!(c.variant, Variant::Relu | Variant::NoNorm))
        .map(|c| c.dir_name())
        .collect();
    assert_eq!(
        ablations,
        [
            "local-relu-w16-seed0",
            "local-nonorm-w16-seed0",
            "local-relu-w16-seed1",
            "local-nonorm-w16-seed1"
        ]
    );
}

#[test]
fn restricted_grids_and_bad_options() {
    let a = args(&[
        "--windows",
        "16",
        "--seeds",
        "3",
        "--stacks",
        "3to1",
        "--kinds",
        "rattention",
        "--ablations",
        "",
    ]);
    let names: Vec<String> = a
        .grid()
        .unwrap()
        .cells()
        .iter()
        .map(|c| c.dir_name())
        .collect();
    assert_eq!(names, ["3to1-rattention-w16-seed3"]);
    let e = |v: &[&str]| format!("{:#}", args(v).grid().unwrap_err());
    assert!(e(&["--stacks", "2to1"]).contains("--stacks: unknown stack \"2to1\""));
    assert!(e(&["--kinds", "relu"]).contains("--kinds: relu is an ablation"));
    assert!(e(&["--ablations", "swa"]).contains("--ablations: swa is not an ablation"));
    assert!(e(&["--windows", "0"]).contains("window 0 must be > 0"));
    assert!(e(&["--set", "model.window=4"])
        .contains("--set model.window=4: the sweep sets model.window for each run itself"));
}

#[test]
fn every_cell_loads_as_the_config_it_names() {
    let a = args(&[
        "--steps",
        "7",
        "--local-config",
        repo("configs/tiny.toml").to_str().unwrap(),
        "--three-to-one-config",
        repo("configs/tiny-3to1.toml").to_str().unwrap(),
    ]);
    for c in a.grid().unwrap().cells() {
        let spec = a.spec(c);
        let cfg = RunConfig::load(&spec.config, &spec.overrides).unwrap();
        let m = &cfg.model;
        assert_eq!(cfg.train.steps, 7);
        assert_eq!(cfg.train.seed, c.seed);
        let kinds = m.layer_kinds().unwrap();
        let locals = kinds
            .iter()
            .filter(|k| **k == model::config::LayerKind::Local)
            .count();
        match c.variant {
            Variant::Full | Variant::FullNope => assert_eq!(locals, 0, "{}", c.dir_name()),
            Variant::Swa => assert_eq!(m.local_kind, model::config::LocalKind::Swa),
            _ => assert_eq!(m.local_kind, model::config::LocalKind::Rattention),
        }
        if let Some(w) = c.window {
            assert_eq!(m.window, w);
            let want = if c.stack == Stack::Local { 2 } else { 3 };
            assert_eq!(locals, want, "{}", c.dir_name());
        }
        assert_eq!(
            m.rla.feature_map == model::config::FeatureMap::Relu,
            c.variant == Variant::Relu
        );
        assert_eq!(m.rla.norm, c.variant != Variant::NoNorm);
        // The paper's full-attention baseline has RoPE on its layers; full-nope has none.
        assert_eq!(
            m.global_rope,
            c.variant == Variant::Full,
            "{}",
            c.dir_name()
        );
    }
}

#[test]
fn full_nope_is_a_kind_of_its_own_beside_full() {
    let cells = args(&[
        "--kinds",
        "swa,full,full-nope",
        "--stacks",
        "local",
        "--seeds",
        "0",
    ])
    .grid()
    .unwrap()
    .cells();
    let names: Vec<String> = cells.iter().map(|c| c.dir_name()).collect();
    assert!(names.contains(&"local-full-seed0".to_string()), "{names:?}");
    assert!(
        names.contains(&"local-full-nope-seed0".to_string()),
        "{names:?}"
    );
    let full = cells.iter().find(|c| c.variant == Variant::Full).unwrap();
    assert!(full
        .overrides()
        .contains(&"model.global_rope=true".to_string()));
    let nope = cells
        .iter()
        .find(|c| c.variant == Variant::FullNope)
        .unwrap();
    assert!(!nope.overrides().iter().any(|o| o.contains("global_rope")));
    assert_eq!(Variant::FullNope.title(), "full attention, no RoPE");
}

fn fake(cell: Cell, far: (usize, usize), loss: f64, kv: u64, rla: u64) -> RunResult {
    RunResult {
        cell,
        steps: 400,
        batch: 16,
        seq_len: 256,
        final_train_loss: loss,
        eval_loss: loss,
        recall: vec![(10, 10), (9, 10), (8, 10), (7, 10), (6, 10), far],
        kv_bytes: kv,
        rla_state_bytes: rla,
        wall_s: 12.0,
        load: 1.5,
    }
}

fn write_result(out: &Path, r: &RunResult) {
    let dir = out.join(r.cell.dir_name());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(result_path(&dir), serde_json::to_string(r).unwrap()).unwrap();
}

#[test]
fn finished_runs_are_skipped_and_unfinished_ones_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let cells = args(&["--windows", "8,16", "--stacks", "local"])
        .grid()
        .unwrap()
        .cells();
    assert_eq!(pending(out, &cells), cells);
    write_result(out, &fake(cells[0], (1, 4), 1.0, 1, 0));
    write_result(out, &fake(cells[3], (1, 4), 1.0, 1, 0));
    // A run that was interrupted: its directory exists, its result does not.
    std::fs::create_dir_all(out.join(cells[1].dir_name())).unwrap();
    std::fs::write(out.join(cells[1].dir_name()).join("run.json"), "{}").unwrap();
    let todo = pending(out, &cells);
    assert_eq!(todo.len(), cells.len() - 2);
    assert!(!todo.contains(&cells[0]) && !todo.contains(&cells[3]));
    assert!(todo.contains(&cells[1]));
    let got = collect(out, &cells);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].cell, cells[0]);
}

#[test]
fn distances_sum_into_the_fixed_buckets() {
    // (correct, total) = (d % 3, 2) at each distance d of 0..=256, summed by a naive loop.
    let by: Vec<(usize, usize)> = (0..=256).map(|d| (d % 3, 2)).collect();
    let got = bucket_counts(&by);
    for (i, &(lo, hi)) in SWEEP_BUCKETS.iter().enumerate() {
        let (mut c, mut t) = (0, 0);
        for d in 0..=256usize {
            if d >= lo && d <= hi {
                c += d % 3;
                t += 2;
            }
        }
        assert_eq!(got[i], (c, t), "bucket {}", bucket_label((lo, hi)));
    }
    assert_eq!(got[5].1, 2 * 128, "129..=256");
    assert_eq!(bucket_label(SWEEP_BUCKETS[0]), "1-8");
    assert_eq!(bucket_label(SWEEP_BUCKETS[5]), ">128");
}

#[test]
fn table_and_png_from_fake_results() {
    let tmp = tempfile::tempdir().unwrap();
    let cells = args(&["--windows", "8,16"]).grid().unwrap().cells();
    // Results for every seed-0 cell and for one seed-1 cell; one failure.
    let mut results: Vec<RunResult> = cells
        .iter()
        .filter(|c| c.seed == 0)
        .enumerate()
        .map(|(i, &c)| fake(c, (i, 20), 0.5 + i as f64 / 10.0, 1000 * (i as u64 + 1), 64))
        .collect();
    let c1 = Cell {
        seed: 1,
        ..results[1].cell
    };
    results.push(fake(c1, (4, 20), 0.7, results[1].kv_bytes, 64));
    let failed_cell = *cells.iter().rev().find(|c| c.seed == 1).unwrap();
    let md = table(&cells, &results, &[(failed_cell, "rla: boom\nmore".into())]);
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ")).collect();
    // Header + one row per cell (seeds merged) + header + one row per run.
    let groups = cells.iter().filter(|c| c.seed == 0).count();
    assert_eq!(rows.len(), 1 + groups + 1 + results.len(), "{md}");
    assert!(
        md.contains("400 steps × 16 sequences × 256 tokens = 1638400 tokens"),
        "{md}"
    );
    // The merged row of results[1]'s cell: mean loss (0.6 + 0.7) / 2, far recall 5 % and 20 %
    // (mean 12.5), per seed listed.
    let name = results[1].cell;
    let row = rows
        .iter()
        .find(|r| {
            r.starts_with(&format!(
                "| {} | {} | {} | 2 |",
                name.stack.name(),
                name.variant.title(),
                name.window.unwrap()
            ))
        })
        .unwrap_or_else(|| panic!("no merged row in\n{md}"));
    assert!(row.contains("| 0.6500 |"), "{row}");
    assert!(row.contains("| 12.5 | 5.0, 20.0 |"), "{row}");
    assert!(md.contains(&format!("Failed: {}: rla: boom", failed_cell.dir_name())));
    assert!(md.contains("Not finished ("), "{md}");
    let png = tmp.path().join("sweep.png");
    pareto_png(&png, &cells, &results, None).unwrap();
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (1400, 620));
    assert!(std::fs::metadata(&png).unwrap().len() > 1000);
    // Not a blank image: some pixels are drawn in the series' colours.
    let rgb = img.to_rgb8();
    let red = rgb.pixels().filter(|p| p.0 == [214, 39, 40]).count();
    assert!(
        red > 10,
        "the all-local RAttention line is missing ({red} pixels)"
    );
}

#[test]
fn finished_runs_made_with_other_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path();
    let a = args(&["--windows", "8", "--stacks", "local", "--steps", "400"]);
    let cells = a.grid().unwrap().cells();
    let r = fake(cells[0], (1, 4), 1.0, 1, 0);
    write_result(out, &r);
    let dir = out.join(cells[0].dir_name());
    std::fs::write(
        dir.join("run.json"),
        serde_json::to_string(&a.spec(cells[0])).unwrap(),
    )
    .unwrap();
    check_finished(out, &cells, |c| a.spec(c)).unwrap();
    // The same directory swept again with another budget.
    let b = args(&["--windows", "8", "--stacks", "local", "--steps", "200"]);
    let e = format!(
        "{:#}",
        check_finished(out, &cells, |c| b.spec(c)).unwrap_err()
    );
    assert!(
        e.contains("1 finished runs") && e.contains(&cells[0].dir_name()),
        "{e}"
    );
}
