//! Checkpoints across the `model.scan_layers` layouts: a scanned checkpoint evaluates unrolled
//! with the same loss, `rattn convert` round-trips bit-exactly and moves every value where the
//! stacking puts it, `--resume` continues a run in the other layout, and another model is still
//! refused.

use super::*;
use crate::checkpoint::layout::{self, ConvertArgs};

/// The tiny model at T = 64, batch 4, 4 layers alternating local and global (period 2, two
/// periods in the scan).
fn tiny(steps: usize, extra: &[&str]) -> RunConfig {
    super::tests::tiny_layers(4, steps, extra)
}

fn tmp(name: &str) -> PathBuf {
    super::tests::tmp(&format!("layout-{name}"))
}

fn convert(from: &Path, out: PathBuf, set: &[&str]) -> Result<PathBuf> {
    layout::run(&ConvertArgs {
        checkpoint: from.to_path_buf(),
        out,
        overrides: set.iter().map(|s| s.to_string()).collect(),
    })
}

/// Every stacked tensor `{group}.scan.{j}.X` of `scanned` (shape `[P, ...]`) against the
/// per-layer tensors `{group}.layers.{p·period + j}.X` of `unrolled`, row by row, and every other
/// tensor against its namesake: equal to the bit. Returns how many tensors were compared.
fn check_unstacked(scanned: &Checkpoint, unrolled: &Checkpoint, period: usize) -> usize {
    let find = |name: &str| {
        unrolled
            .tensors
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("the unrolled checkpoint lacks {name}"))
    };
    let mut compared = 0;
    for t in &scanned.tensors {
        let (group, rest) = t.name.split_once('.').unwrap();
        let Some(stacked) = rest.strip_prefix("scan.") else {
            assert_eq!(find(&t.name), t);
            compared += 1;
            continue;
        };
        let (j, x) = stacked.split_once('.').unwrap();
        let j: usize = j.parse().unwrap();
        let periods = t.shape[0];
        let row = t.data.len() / periods;
        for p in 0..periods {
            let u = find(&format!("{group}.layers.{}.{x}", p * period + j));
            assert_eq!(u.shape, t.shape[1..], "{}", u.name);
            let want = &t.data[p * row..(p + 1) * row];
            assert!(
                u.data
                    .iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{} differs from row {p} of {}",
                u.name,
                t.name
            );
            compared += 1;
        }
    }
    assert_eq!(compared, unrolled.tensors.len(), "tensors left over");
    compared
}

#[test]
fn a_scanned_checkpoint_evaluates_and_converts_unrolled_and_another_model_is_refused() {
    let dir = tmp("eval");
    let scanned = tiny(2, &["model.scan_layers=true", "mesh.fsdp=2"]);
    let unrolled = tiny(2, &[]);
    let report = train(&scanned, None, &dir, false, true, None).unwrap();
    let sharded = report.last_checkpoint.unwrap();
    assert!(
        sharded.is_dir(),
        "a 2-device run writes a sharded checkpoint"
    );

    // Evaluated in either layout: the same loss and recall.
    let a = eval(&scanned, None, &sharded, 8).unwrap();
    let b = eval(&unrolled, None, &sharded, 8).unwrap();
    assert!(
        (a.loss - b.loss).abs() <= 1e-6,
        "eval loss scanned {} vs unrolled {}",
        a.loss,
        b.loss
    );
    assert_eq!(a.by_distance, b.by_distance);

    // Convert the sharded scanned checkpoint to an unrolled file: every value where the
    // stacking puts it (checked row by row), then back: bit-exact.
    let original = checkpoint::load(&sharded, None).unwrap();
    let flat = convert(&sharded, dir.join("unrolled"), &[]).unwrap();
    let c1 = checkpoint::load(&flat, None).unwrap();
    assert_eq!(c1.model_config, model_toml(&unrolled));
    let n = check_unstacked(&original, &c1, 2);
    assert_eq!(
        n,
        3 * Model::new(unrolled.model.clone())
            .unwrap()
            .param_specs()
            .len()
    );
    let back = convert(
        &flat,
        dir.join("back.safetensors"),
        &["model.scan_layers=true"],
    )
    .unwrap();
    let c2 = checkpoint::load(&back, None).unwrap();
    assert_eq!(
        c2, original,
        "scanned → unrolled → scanned is not bit-exact"
    );

    // The converted file evaluates unrolled to the loss of the converted-on-load checkpoint,
    // and the scanned file unrolled (a file converted on load) to the same.
    let c = eval(&unrolled, None, &flat, 8).unwrap();
    assert_eq!(c.loss.to_bits(), b.loss.to_bits());
    let d = eval(&unrolled, None, &back, 8).unwrap();
    assert_eq!(d.loss.to_bits(), b.loss.to_bits());
    eprintln!(
        "layout: eval loss scanned {} vs unrolled {} (|Δ| {:.1e}); {n} tensors moved bit-exactly",
        a.loss,
        b.loss,
        (a.loss - b.loss).abs()
    );

    // Refusals: another model, overwriting, a key convert cannot change.
    let other = tiny(2, &["model.d_model=32", "model.ffn_dim=64"]);
    let e = format!("{:#}", eval(&other, None, &sharded, 8).unwrap_err());
    assert!(
        e.contains("another model configuration")
            && e.contains("model.d_model: 64 in the checkpoint, 32 here"),
        "{e}"
    );
    let e = format!("{:#}", convert(&sharded, flat.clone(), &[]).unwrap_err());
    assert!(e.contains("refusing to overwrite"), "{e}");
    let e = format!(
        "{:#}",
        convert(&sharded, dir.join("x.safetensors"), &["model.d_model=8"]).unwrap_err()
    );
    assert!(e.contains("only the parameter layout"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_in_the_other_layout_continues_the_run() {
    // An unrolled run of 4 steps on fsdp = 2 (sharded checkpoints at steps 2 and 4) ...
    let dir = tmp("resume");
    let every = ["train.checkpoint_every=2", "mesh.fsdp=2"];
    let straight = train(&tiny(4, &every), None, &dir, false, true, None).unwrap();
    // ... whose step-2 checkpoint a scanned run on one device resumes: parameters and both
    // Adam moments stacked on load, the same losses at steps 3 and 4.
    let all = checkpoint::list(&dir).unwrap();
    assert_eq!(all.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4]);
    assert!(all[0].1.is_dir());
    std::fs::remove_dir_all(&all[1].1).unwrap();
    let scanned = tiny(4, &["model.scan_layers=true"]);
    let resumed = train(&scanned, None, &dir, true, true, None).unwrap();
    assert_eq!(resumed.losses.len(), 2);
    for (s, (l, w)) in resumed.losses.iter().zip(&straight.losses[2..]).enumerate() {
        let e = ((l - w) / w).abs();
        assert!(
            e <= 1e-5,
            "step {}: resumed scanned {l} vs unrolled {w}",
            s + 3
        );
    }
    eprintln!(
        "layout: resumed scanned {:?} vs unrolled {:?}",
        resumed.losses,
        &straight.losses[2..]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `rattn convert` of a sharded scanned checkpoint (fsdp = 2) into a sharded unrolled one on
/// another mesh (tensor = 2): the format `rattn train` writes, for that mesh; evaluates to the
/// source's loss bit for bit and resumes the run; by default keeps the source's mesh; a mesh that
/// does not split a tensor is refused before anything is written; nothing is overwritten.
#[test]
fn convert_writes_a_sharded_checkpoint_for_another_mesh() {
    let dir = tmp("sharded-out");
    let run_dir = dir.join("run");
    let every = [
        "model.scan_layers=true",
        "mesh.fsdp=2",
        "train.checkpoint_every=2",
    ];
    let straight = train(&tiny(4, &every), None, &run_dir, false, true, None).unwrap();
    let all = checkpoint::list(&run_dir).unwrap();
    assert_eq!(all.iter().map(|c| c.0).collect::<Vec<_>>(), vec![2, 4]);
    let source = &all[0].1;
    assert!(
        source.is_dir(),
        "a 2-device run writes a sharded checkpoint"
    );
    let to_tensor = ["mesh.fsdp=1", "mesh.tensor=2"];

    // A mesh that does not split a tensor: named (parameter, dim, axes) before anything exists.
    let out = dir.join("unrolled");
    let e = format!(
        "{:#}",
        convert(source, out.clone(), &["mesh.fsdp=1", "mesh.tensor=3"]).unwrap_err()
    );
    assert!(
        e.contains("not divisible by 3 = tensor 3") && e.contains("dim ") && e.contains("layers."),
        "{e}"
    );
    assert!(!out.exists(), "a refused mesh wrote {}", out.display());
    eprintln!("convert sharded: tensor = 3 refused: {e}");

    // Unrolled, sharded for tensor = 2.
    let written = convert(source, out.clone(), &to_tensor).unwrap();
    assert_eq!(written, out.join("ckpt_00000002"));
    let s = checkpoint::sharded::ShardedCheckpoint::open(&written).unwrap();
    assert_eq!(s.partitions, 2);
    let m = s.mesh_config.clone().unwrap();
    assert_eq!((m.data, m.fsdp, m.seq, m.tensor), (1, 1, 1, 2));
    let split = s.tensors.values().filter(|t| t.pieces.len() == 2).count();
    assert!(split > 0, "no tensor is cut in two on tensor = 2");
    let (from, to) = (
        checkpoint::load(source, None).unwrap(),
        checkpoint::load(&written, None).unwrap(),
    );
    let unrolled = tiny(4, &to_tensor);
    assert_eq!(to.model_config, model_toml(&unrolled));
    let n = check_unstacked(&from, &to, 2);

    // The same loss as the source's (read unrolled, converted on load): |Δ| = 0.
    let a = eval(&unrolled, None, source, 8).unwrap();
    let b = eval(&unrolled, None, &written, 8).unwrap();
    assert_eq!(
        a.loss.to_bits(),
        b.loss.to_bits(),
        "{} vs {}",
        a.loss,
        b.loss
    );

    // By default the source's mesh is kept.
    let kept = convert(source, dir.join("kept"), &[]).unwrap();
    let k = checkpoint::sharded::ShardedCheckpoint::open(&kept).unwrap();
    assert_eq!(
        k.mesh_config.as_ref().map(|m| (m.fsdp, m.tensor)),
        Some((2, 1))
    );
    assert_eq!(k.partitions, 2);

    // Nothing is overwritten: not the output directory's checkpoint, not one named directly.
    let index = std::fs::read(written.join("index_00000.json")).unwrap();
    for target in [out.clone(), written.clone()] {
        let e = format!("{:#}", convert(source, target, &to_tensor).unwrap_err());
        assert!(e.contains("refusing to overwrite"), "{e}");
    }
    assert_eq!(
        std::fs::read(written.join("index_00000.json")).unwrap(),
        index
    );

    // `--resume` on tensor = 2 from the converted checkpoint continues the run.
    let resumed = train(&unrolled, None, &out, true, true, None).unwrap();
    assert_eq!(resumed.losses.len(), 2);
    for (st, (l, w)) in resumed.losses.iter().zip(&straight.losses[2..]).enumerate() {
        let e = ((l - w) / w).abs();
        assert!(e <= 1e-5, "step {}: resumed {l} vs straight {w}", st + 3);
    }
    eprintln!(
        "convert sharded: {n} tensors, {split} cut on tensor = 2; eval loss {} = {} \
         (|Δ| 0); resumed {:?} vs {:?}",
        a.loss,
        b.loss,
        resumed.losses,
        &straight.losses[2..]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `model.scan_unroll` changes only the traced loop: a checkpoint written with another unroll is
/// the same model (no conversion), in either layout; anything else is still refused.
#[test]
fn scan_unroll_alone_is_the_same_model() {
    let model_toml = |extra: &[&str]| {
        let cfg = tiny(1, extra);
        toml::to_string(&cfg.model).unwrap()
    };
    let path = Path::new("ckpt");
    let scanned = model_toml(&["model.scan_layers=true"]);
    let unrolled2 = model_toml(&["model.scan_layers=true", "model.scan_unroll=2"]);
    assert_ne!(
        scanned, unrolled2,
        "scan_unroll must appear in the [model] table"
    );
    assert_eq!(
        layout::compare(path, &unrolled2, &scanned).unwrap(),
        layout::ConfigMatch::Same
    );
    assert!(matches!(
        layout::compare(path, &unrolled2, &model_toml(&[])).unwrap(),
        layout::ConfigMatch::OtherLayout { .. }
    ));
    let other = model_toml(&["model.scan_layers=true", "model.d_model=32"]);
    let err = layout::compare(path, &other, &scanned).unwrap_err();
    assert!(
        err.to_string().contains("another model configuration"),
        "{err}"
    );
}
