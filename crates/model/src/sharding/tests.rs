//! Unit tests of the mesh, the rules and the partition specs.
use super::*;
use LogicalAxis::{Batch, Embed, HeadDim, Mlp, QHeads};
use MeshAxis::{Data, Fsdp, Seq, Tensor};

fn mesh(data: i64, fsdp: i64, seq: i64, tensor: i64) -> MeshConfig {
    MeshConfig {
        data,
        fsdp,
        seq,
        tensor,
        ..MeshConfig::default()
    }
}

#[test]
fn defaults_are_one_device_and_maxtext_rules() {
    let m = MeshConfig::default().resolve(1).unwrap();
    assert_eq!(m, Mesh::single());
    let r = AxisRules::default();
    assert_eq!(r.get(Batch), [Data, Fsdp]);
    assert_eq!(r.get(Embed), [Fsdp, Seq]);
    assert_eq!(r.get(LogicalAxis::Norm), [Tensor]);
    assert_eq!(r.get(QHeads), [Tensor]);
    assert_eq!(r.get(Mlp), [Tensor]);
    assert_eq!(r.get(LogicalAxis::Length), [Seq]);
    assert_eq!(r.get(HeadDim), []);
    assert_eq!(
        r.to_string(),
        "batch → [data, fsdp], length → [seq], vocab → [tensor], embed → [fsdp, seq], \
         norm → [tensor], q_heads → [tensor], kv_heads → [tensor], head_dim → [], mlp → [tensor], \
         cache_length → [], feature → [], activation_embed → [tensor], layers → []"
    );
}

#[test]
fn minus_one_takes_the_rest() {
    let m = mesh(2, -1, 1, 2).resolve(16).unwrap();
    assert_eq!(m.size(Fsdp), 4);
    assert_eq!(m.device_count(), 16);
    assert_eq!(
        m.to_string(),
        "16 devices = data 2 × fsdp 4 × seq 1 × tensor 2"
    );
    assert_eq!(mesh(1, 1, 1, -1).resolve(1).unwrap(), Mesh::single());
    assert_eq!(mesh(1, 1, 1, 1).fixed_device_count().unwrap(), Some(1));
    assert_eq!(mesh(1, -1, 1, 1).fixed_device_count().unwrap(), None);
}

#[test]
fn mesh_errors_name_axes_sizes_and_devices() {
    let e = mesh(0, 1, 1, 1).resolve(1).unwrap_err().to_string();
    assert_eq!(
        e,
        "mesh.data = 0: a mesh size must be >= 1, or -1 for the rest of the devices"
    );
    let e = mesh(-1, 1, 1, -1).resolve(4).unwrap_err().to_string();
    assert_eq!(
        e,
        "mesh.data and mesh.tensor are both -1: at most one axis may take the rest of the devices"
    );
    let e = mesh(2, 2, 1, 1).resolve(8).unwrap_err().to_string();
    assert_eq!(
        e,
        "mesh data=2, fsdp=2, seq=1, tensor=1 spans 4 devices but there are 8: make the \
         product of the sizes 8, or set one axis to -1"
    );
    let e = mesh(3, -1, 1, 1).resolve(8).unwrap_err().to_string();
    assert_eq!(
        e,
        "mesh data=3, fsdp=-1, seq=1, tensor=1: the fixed sizes multiply to 3, which does not \
         divide the 8 devices, so mesh.fsdp = -1 has no size"
    );
    assert_eq!(
        mesh(1, 1, 1, 1).resolve(0).unwrap_err(),
        MeshError::NoDevices
    );
    assert_eq!(
        "fsd".parse::<MeshAxis>().unwrap_err().to_string(),
        "unknown mesh axis \"fsd\" (known: data, fsdp, seq, tensor)"
    );
    let mut r = AxisRules::default();
    assert_eq!(
        r.set(Embed, vec![Fsdp, Fsdp]).unwrap_err().to_string(),
        "mesh.rules.embed lists mesh axis fsdp twice"
    );
}

#[test]
fn spec_errors_name_the_tensor_dim_axis_and_sizes() {
    let m = mesh(1, 4, 1, 2).resolve(8).unwrap();
    let e = m
        .partition_spec("layers.0.ffn.w_up", &[64, 195], &[Embed, Mlp])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "layers.0.ffn.w_up: dim 1 (mlp) of size 195 is not divisible by 2 = tensor 2 \
         (mesh.rules.mlp)"
    );
    let mut cfg = mesh(1, 4, 1, 2);
    cfg.rules.set(Batch, vec![Data, Fsdp, Tensor]).unwrap();
    let e = cfg
        .resolve(8)
        .unwrap()
        .partition_spec("tokens", &[12, 64], &[Batch, Embed])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "tokens: dim 0 (batch) of size 12 is not divisible by 8 = data 1 × fsdp 4 × tensor 2 \
         (mesh.rules.batch)"
    );
    cfg.rules.set(Mlp, vec![Fsdp]).unwrap();
    let e = cfg
        .resolve(8)
        .unwrap()
        .partition_spec("layers.0.ffn.w_gate", &[64, 192], &[Embed, Mlp])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "layers.0.ffn.w_gate: mesh axis fsdp would shard both dim 0 (embed) and dim 1 (mlp); \
         a mesh axis may shard one dimension of a tensor: change mesh.rules.embed or \
         mesh.rules.mlp"
    );
    let e = m
        .partition_spec("x", &[64], &[Embed, Mlp])
        .unwrap_err()
        .to_string();
    assert_eq!(e, "x: shape [64] has 1 dims but 2 logical axes");
}

#[test]
fn two_d_tiled_sharding_with_replication_worked_by_hand() {
    // data 2 × fsdp 2 × seq 1 × tensor 2: device id = 4·d + 2·f + t.
    let m = mesh(2, 2, 1, 2).resolve(8).unwrap();
    let spec = m.partition_spec("wq", &[64, 64], &[Embed, QHeads]).unwrap();
    // embed → [fsdp, seq]; seq has size 1 here, so it cuts nothing.
    assert_eq!(spec, PartitionSpec(vec![vec![Fsdp, Seq], vec![Tensor]]));
    // Tiles [f, t], replicated over d (seq has size 1): the assignment runs over (f, t, d, s)
    // row-major, device 4·d + 2·f + t:
    // (0,0,0)=0 (0,0,1)=4 (0,1,0)=1 (0,1,1)=5 (1,0,0)=2 (1,0,1)=6 (1,1,0)=3 (1,1,1)=7.
    let p = m.sharding(&spec).to_proto();
    assert_eq!(p.r#type, 3);
    assert_eq!(p.tile_assignment_dimensions, vec![2, 2, 2]);
    assert_eq!(p.tile_assignment_devices, vec![0, 4, 1, 5, 2, 6, 3, 7]);
    assert!(p.replicate_on_last_tile_dim);
    m.sharding(&spec)
        .validate(&hlo_builder::Shape::array(
            hlo_builder::ElementType::F32,
            &[64, 64],
        ))
        .unwrap();
    assert_eq!(m.shard_shape(&[64, 64], &spec), vec![32, 32]);

    // Batch over (data, fsdp) major to minor, nothing replicated: tile b = 2·d + f, and the
    // length dim (seq 1) uncut; devices (d, f, t) → t is the replication dim.
    let spec = m
        .partition_spec("tokens", &[8, 16], &[Batch, LogicalAxis::Length])
        .unwrap();
    assert_eq!(spec.to_string(), "[(data, fsdp), seq]");
    let p = m.sharding(&spec).to_proto();
    assert_eq!(p.tile_assignment_dimensions, vec![4, 1, 2]);
    assert_eq!(p.tile_assignment_devices, (0..8).collect::<Vec<i64>>());
    assert!(p.replicate_on_last_tile_dim);

    // Every mesh axis used: no replication dim.
    let m = mesh(1, 2, 1, 4).resolve(8).unwrap();
    let spec = m.partition_spec("w", &[8, 8], &[QHeads, Embed]).unwrap();
    let p = m.sharding(&spec).to_proto();
    assert_eq!(p.tile_assignment_dimensions, vec![4, 2]);
    // (t, f) row-major, device 4·f + t: 0,4,1,5,2,6,3,7.
    assert_eq!(p.tile_assignment_devices, vec![0, 4, 1, 5, 2, 6, 3, 7]);
    assert!(!p.replicate_on_last_tile_dim);

    // Nothing cut: replicated.
    let m = mesh(8, 1, 1, 1).resolve(8).unwrap();
    let spec = m.partition_spec("w", &[8, 8], &[Embed, QHeads]).unwrap();
    assert_eq!(m.sharding(&spec), Sharding::Replicated);
}

#[test]
fn rules_deserialize_over_the_defaults() {
    let cfg: MeshConfig =
        toml::from_str("fsdp = 4\n[rules]\nembed = []\nmlp = \"fsdp\"\n").unwrap();
    assert_eq!(cfg.fsdp, 4);
    assert_eq!(cfg.rules.get(Embed), []);
    assert_eq!(cfg.rules.get(Mlp), [Fsdp]);
    assert_eq!(cfg.rules.get(QHeads), [Tensor]);
    let back: MeshConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    let e = toml::from_str::<MeshConfig>("[rules]\nembd = []\n").unwrap_err();
    assert!(
        e.to_string().contains("unknown logical axis \"embd\"")
            && e.to_string()
                .contains("(known: batch, length, vocab, embed, norm, q_heads,"),
        "{e}"
    );
    let e = toml::from_str::<MeshConfig>("[rules]\nembed = [\"fsd\"]\n").unwrap_err();
    assert!(
        e.to_string()
            .contains("mesh.rules.embed: unknown mesh axis \"fsd\""),
        "{e}"
    );
    let e = toml::from_str::<MeshConfig>("pipeline = 2\n").unwrap_err();
    assert!(e.to_string().contains("pipeline"), "{e}");
}

#[test]
fn embed_shards_over_fsdp_and_seq_and_a_dim_that_does_not_divide_is_named() {
    // fsdp 2 × seq 2: embed dims in 4, each device a quarter.
    let m = mesh(1, 2, 2, 1).resolve(4).unwrap();
    let spec = m.partition_spec("wq", &[64, 64], &[Embed, QHeads]).unwrap();
    assert_eq!(spec.to_string(), "[(fsdp, seq), tensor]");
    assert_eq!(m.shard_shape(&[64, 64], &spec), vec![16, 64]);
    // Tiles over (fsdp, seq) row-major = device 2·f + s: devices in order, nothing replicated.
    let p = m.sharding(&spec).to_proto();
    assert_eq!(p.tile_assignment_dimensions, vec![4, 1]);
    assert_eq!(p.tile_assignment_devices, vec![0, 1, 2, 3]);
    assert!(!p.replicate_on_last_tile_dim);
    // 36 splits in 4 and in 2 but not in 4 × 2.
    let m = mesh(1, 4, 2, 1).resolve(8).unwrap();
    let e = m
        .partition_spec("layers.0.attn.wq", &[36], &[Embed])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "layers.0.attn.wq: dim 0 (embed) of size 36 is not divisible by 8 = fsdp 4 × seq 2 \
         (mesh.rules.embed)"
    );
}

#[test]
fn zero_1_appends_the_replicated_axes_to_the_first_dim_that_divides() {
    let on = |data, fsdp, seq, tensor| {
        let mut c = mesh(data, fsdp, seq, tensor);
        c.shard_optimizer = true;
        let n = (data * fsdp * seq * tensor) as usize;
        c.resolve(n).unwrap()
    };
    // data 8: a replicated [64, 64] moment is cut in 8 rows; a [4, 16] one (4 rows) in its
    // columns; a [6] one nowhere (stays replicated, MaxText's fallback).
    let m = on(8, 1, 1, 1);
    assert!(m.shard_optimizer());
    let cut = |m: &Mesh, shape: &[usize], axes: &[LogicalAxis]| {
        let spec = m.partition_spec("w", shape, axes).unwrap();
        m.optimizer_spec(shape, &spec).to_string()
    };
    assert_eq!(
        cut(&m, &[64, 64], &[Embed, QHeads]),
        "[(fsdp, seq, data), tensor]"
    );
    assert_eq!(cut(&m, &[4, 16], &[QHeads, HeadDim]), "[tensor, data]");
    assert_eq!(cut(&m, &[6], &[HeadDim]), "[-]");
    // data 2 × fsdp 2 × tensor 2: wq [(fsdp, seq), tensor] gains data as the minor axis of its
    // rows; the piece is a slice of the parameter's piece on the same device.
    let m = on(2, 2, 1, 2);
    let shape = [64, 64];
    let spec = m.partition_spec("wq", &shape, &[Embed, QHeads]).unwrap();
    let zero = m.optimizer_spec(&shape, &spec);
    assert_eq!(zero.to_string(), "[(fsdp, seq, data), tensor]");
    assert_eq!(m.shard_shape(&shape, &zero), vec![16, 32]);
    let (param, moment) = (m.sharding(&spec), m.sharding(&zero));
    for d in 0..8 {
        let p = param.tile_offset(d, &shape).unwrap().unwrap();
        let q = moment.tile_offset(d, &shape).unwrap().unwrap();
        assert!(
            q[0] >= p[0] && q[0] + 16 <= p[0] + 32 && q[1] == p[1],
            "device {d}: moment at {q:?} outside the parameter piece at {p:?}"
        );
    }
    // seq kept out of embed (embed → [fsdp]): the moment is cut over seq too.
    let mut c = mesh(1, 2, 2, 1);
    c.shard_optimizer = true;
    c.rules.set(Embed, vec![Fsdp]).unwrap();
    let m = c.resolve(4).unwrap();
    assert_eq!(
        cut(&m, &[64, 64], &[Embed, QHeads]),
        "[(fsdp, seq), tensor]"
    );
    // Off: the moment's spec is the parameter's.
    let m = mesh(8, 1, 1, 1).resolve(8).unwrap();
    assert_eq!(
        cut(&m, &[64, 64], &[Embed, QHeads]),
        "[(fsdp, seq), tensor]"
    );
}
