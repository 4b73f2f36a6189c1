//! HLO text in XLA's syntax, printed from any `HloModuleProto` (ours or XLA's optimized
//! modules). Unknown opcodes and attributes print generically; nothing here panics on odd input.

use std::collections::HashMap;
use std::fmt::Write;

use crate::proto::{
    self, primitive_type_name, HloComputationProto, HloInstructionProto, HloModuleProto,
    LiteralProto, OpSharding, ShapeProto,
};

/// Largest constant (in elements) printed with its values; bigger ones print as `{...}`.
const MAX_PRINTED_LITERAL: usize = 32;

fn join_i64(v: &[i64]) -> String {
    v.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// A shape as XLA prints it: `f32[2,3]{1,0}` (`layout = false`: `f32[2,3]`).
pub fn shape_to_string(s: &ShapeProto, layout: bool) -> String {
    let mut out = String::new();
    write_shape(&mut out, s, layout);
    out
}

fn write_shape(out: &mut String, s: &ShapeProto, layout: bool) {
    if s.element_type == proto::primitive_type::TUPLE {
        out.push('(');
        for (i, e) in s.tuple_shapes.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            write_shape(out, e, layout);
        }
        out.push(')');
        return;
    }
    out.push_str(&primitive_type_name(s.element_type));
    if s.element_type == proto::primitive_type::TOKEN
        || s.element_type == proto::primitive_type::OPAQUE_TYPE
    {
        return;
    }
    out.push('[');
    for (i, d) in s.dimensions.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        if s.is_dynamic_dimension.get(i).copied().unwrap_or(false) {
            out.push_str("<=");
        }
        let _ = write!(out, "{d}");
    }
    out.push(']');
    if let (true, Some(l)) = (layout && !s.dimensions.is_empty(), &s.layout) {
        let _ = write!(out, "{{{}", join_i64(&l.minor_to_major));
        let mut extra = String::new();
        for t in &l.tiles {
            let _ = write!(extra, "T({})", join_i64(&t.dimensions));
        }
        if l.element_size_in_bits != 0 {
            let _ = write!(extra, "E({})", l.element_size_in_bits);
        }
        if l.memory_space != 0 {
            let _ = write!(extra, "S({})", l.memory_space);
        }
        if !extra.is_empty() {
            out.push(':');
            out.push_str(&extra);
        }
        out.push('}');
    }
}

fn program_shape_string(p: &proto::ProgramShapeProto) -> String {
    let params: Vec<String> = p
        .parameters
        .iter()
        .map(|s| shape_to_string(s, true))
        .collect();
    let result = p
        .result
        .as_ref()
        .map(|s| shape_to_string(s, true))
        .unwrap_or_else(|| "()".into());
    format!("({})->{}", params.join(", "), result)
}

fn fmt_float(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v}")
    }
}

/// The literal's values as strings, row-major; `None` for kinds not stored here.
fn literal_values(l: &LiteralProto, ty: i32) -> Option<Vec<String>> {
    let halves = |b: &[u8], f: fn(u16) -> f64| {
        b.chunks_exact(2)
            .map(|c| fmt_float(f(u16::from_le_bytes([c[0], c[1]]))))
            .collect::<Vec<_>>()
    };
    use crate::ElementType as E;
    Some(match E::from_primitive_type(ty)? {
        E::Pred => l.preds.iter().map(|b| b.to_string()).collect(),
        E::S8 => l.s8s.iter().map(|&b| (b as i8).to_string()).collect(),
        E::S16 => l
            .s16s
            .chunks_exact(2)
            .map(|c| i16::from_le_bytes([c[0], c[1]]).to_string())
            .collect(),
        E::S32 => l.s32s.iter().map(i32::to_string).collect(),
        E::S64 => l.s64s.iter().map(i64::to_string).collect(),
        E::U8 => l.u8s.iter().map(u8::to_string).collect(),
        E::U16 => l
            .u16s
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]).to_string())
            .collect(),
        E::U32 => l.u32s.iter().map(u32::to_string).collect(),
        E::U64 => l.u64s.iter().map(u64::to_string).collect(),
        E::F16 => halves(&l.f16s, |b| half::f16::from_bits(b).to_f64()),
        E::Bf16 => halves(&l.bf16s, |b| half::bf16::from_bits(b).to_f64()),
        E::F32 => l.f32s.iter().map(|&v| fmt_float(f64::from(v))).collect(),
        E::F64 => l.f64s.iter().map(|&v| fmt_float(v)).collect(),
    })
}

fn literal_string(l: Option<&LiteralProto>, shape: Option<&ShapeProto>) -> String {
    let Some(l) = l else { return "{...}".into() };
    let Some(s) = l.shape.as_ref().or(shape) else {
        return "{...}".into();
    };
    if s.element_type == proto::primitive_type::TUPLE {
        let parts: Vec<String> = l
            .tuple_literals
            .iter()
            .map(|t| literal_string(Some(t), None))
            .collect();
        return format!("({})", parts.join(", "));
    }
    let n: i64 = s.dimensions.iter().product();
    let Some(vals) = literal_values(l, s.element_type) else {
        return "{...}".into();
    };
    if vals.len() as i64 != n || vals.len() > MAX_PRINTED_LITERAL {
        return "{...}".into();
    }
    if s.dimensions.is_empty() {
        return vals.into_iter().next().unwrap_or_default();
    }
    // Nested braces, one level per dimension.
    fn nest(dims: &[i64], vals: &[String]) -> String {
        if dims.len() == 1 {
            return format!("{{{}}}", vals.join(", "));
        }
        let inner: i64 = dims[1..].iter().product();
        let parts: Vec<String> = if inner == 0 {
            (0..dims[0]).map(|_| nest(&dims[1..], &[])).collect()
        } else {
            vals.chunks(inner as usize)
                .map(|c| nest(&dims[1..], c))
                .collect()
        };
        format!("{{ {} }}", parts.join(", "))
    }
    nest(&s.dimensions, &vals)
}

fn sharding_string(s: &OpSharding) -> String {
    match s.r#type {
        0 => "{replicated}".into(),
        1 => format!(
            "{{maximal device={}}}",
            s.tile_assignment_devices.first().copied().unwrap_or(0)
        ),
        2 => {
            let parts: Vec<String> = s.tuple_shardings.iter().map(sharding_string).collect();
            format!("{{{}}}", parts.join(", "))
        }
        3 => {
            let mut out = format!("{{devices=[{}]", join_i64(&s.tile_assignment_dimensions));
            if !s.iota_reshape_dims.is_empty() {
                let _ = write!(out, "<=[{}]", join_i64(&s.iota_reshape_dims));
                if !s.iota_transpose_perm.is_empty() {
                    let perm: Vec<String> =
                        s.iota_transpose_perm.iter().map(i32::to_string).collect();
                    let _ = write!(out, "T({})", perm.join(","));
                }
            } else {
                out.push_str(&join_i64(&s.tile_assignment_devices));
            }
            if s.replicate_on_last_tile_dim {
                out.push_str(" last_tile_dim_replicate");
            }
            if !s.last_tile_dims.is_empty() {
                let names: Vec<&str> = s
                    .last_tile_dims
                    .iter()
                    .map(|t| match t {
                        0 => "replicated",
                        4 => "manual",
                        _ => "unknown",
                    })
                    .collect();
                let _ = write!(out, " last_tile_dims={{{}}}", names.join(", "));
            }
            out.push('}');
            out
        }
        4 => "{manual}".into(),
        _ => "{unknown}".into(),
    }
}

fn precision_name(p: i32) -> String {
    match p {
        0 => "default".into(),
        1 => "high".into(),
        2 => "highest".into(),
        3 => "packed_nibble".into(),
        other => format!("precision{other}"),
    }
}

fn window_string(w: &proto::Window) -> String {
    let dims = &w.dimensions;
    let field =
        |f: fn(&proto::WindowDimension) -> String| dims.iter().map(f).collect::<Vec<_>>().join("x");
    let mut parts = vec![format!("size={}", field(|d| d.size.to_string()))];
    if dims.iter().any(|d| d.stride != 1) {
        parts.push(format!("stride={}", field(|d| d.stride.to_string())));
    }
    if dims
        .iter()
        .any(|d| d.padding_low != 0 || d.padding_high != 0)
    {
        parts.push(format!(
            "pad={}",
            field(|d| format!("{}_{}", d.padding_low, d.padding_high))
        ));
    }
    if dims.iter().any(|d| d.base_dilation > 1) {
        parts.push(format!(
            "lhs_dilate={}",
            field(|d| d.base_dilation.to_string())
        ));
    }
    if dims.iter().any(|d| d.window_dilation > 1) {
        parts.push(format!(
            "rhs_dilate={}",
            field(|d| d.window_dilation.to_string())
        ));
    }
    format!("{{{}}}", parts.join(" "))
}

fn rng_algorithm_name(a: i32) -> String {
    match a {
        1 => "rng_three_fry".into(),
        2 => "rng_philox".into(),
        _ => "rng_default".into(),
    }
}

fn api_version_name(v: i32) -> String {
    match v {
        1 => "API_VERSION_ORIGINAL".into(),
        2 => "API_VERSION_STATUS_RETURNING".into(),
        3 => "API_VERSION_STATUS_RETURNING_UNIFIED".into(),
        4 => "API_VERSION_TYPED_FFI".into(),
        other => format!("API_VERSION_{other}"),
    }
}

struct Ctx<'a> {
    comp_names: HashMap<i64, &'a str>,
}

impl Ctx<'_> {
    fn comp(&self, id: i64) -> String {
        match self.comp_names.get(&id) {
            Some(n) => format!("%{n}"),
            None => format!("%<computation {id}>"),
        }
    }

    fn attrs(
        &self,
        ins: &HloInstructionProto,
        operand_shapes: &[Option<&ShapeProto>],
    ) -> Vec<String> {
        let mut a = Vec::new();
        let op = ins.opcode.as_str();
        let called = &ins.called_computation_ids;
        match op {
            "iota" => a.push(format!(
                "iota_dimension={}",
                ins.dimensions.first().copied().unwrap_or(0)
            )),
            "broadcast" | "transpose" | "reduce" | "reverse" | "concatenate" | "sort"
            | "reduce-scatter" | "all-gather" | "map" => {
                a.push(format!("dimensions={{{}}}", join_i64(&ins.dimensions)))
            }
            _ if !ins.dimensions.is_empty() => {
                a.push(format!("dimensions={{{}}}", join_i64(&ins.dimensions)))
            }
            _ => {}
        }
        if op == "get-tuple-element" {
            a.push(format!("index={}", ins.tuple_index));
        }
        if !ins.slice_dimensions.is_empty() {
            let parts: Vec<String> = ins
                .slice_dimensions
                .iter()
                .map(|s| {
                    if s.stride == 1 {
                        format!("[{}:{}]", s.start, s.limit)
                    } else {
                        format!("[{}:{}:{}]", s.start, s.limit, s.stride)
                    }
                })
                .collect();
            a.push(format!("slice={{{}}}", parts.join(", ")));
        }
        if !ins.dynamic_slice_sizes.is_empty() {
            a.push(format!(
                "dynamic_slice_sizes={{{}}}",
                join_i64(&ins.dynamic_slice_sizes)
            ));
        }
        if let Some(p) = &ins.padding_config {
            let parts: Vec<String> = p
                .dimensions
                .iter()
                .map(|d| {
                    if d.interior_padding != 0 {
                        format!(
                            "{}_{}_{}",
                            d.edge_padding_low, d.edge_padding_high, d.interior_padding
                        )
                    } else {
                        format!("{}_{}", d.edge_padding_low, d.edge_padding_high)
                    }
                })
                .collect();
            a.push(format!("padding={}", parts.join("x")));
        }
        if let Some(w) = &ins.window {
            a.push(format!("window={}", window_string(w)));
        }
        if let Some(d) = &ins.dot_dimension_numbers {
            for (name, v) in [
                ("lhs_batch_dims", &d.lhs_batch_dimensions),
                ("lhs_contracting_dims", &d.lhs_contracting_dimensions),
                ("rhs_batch_dims", &d.rhs_batch_dimensions),
                ("rhs_contracting_dims", &d.rhs_contracting_dimensions),
            ] {
                if !v.is_empty() {
                    a.push(format!("{name}={{{}}}", join_i64(v)));
                }
            }
        }
        if let Some(p) = &ins.precision_config {
            if p.operand_precision.iter().any(|&x| x != 0) {
                let names: Vec<String> = p
                    .operand_precision
                    .iter()
                    .map(|&x| precision_name(x))
                    .collect();
                a.push(format!("operand_precision={{{}}}", names.join(",")));
            }
            if p.algorithm != 0 {
                a.push(format!("algorithm={}", p.algorithm));
            }
        }
        if let Some(g) = &ins.gather_dimension_numbers {
            a.push(format!("offset_dims={{{}}}", join_i64(&g.offset_dims)));
            a.push(format!(
                "collapsed_slice_dims={{{}}}",
                join_i64(&g.collapsed_slice_dims)
            ));
            a.push(format!(
                "start_index_map={{{}}}",
                join_i64(&g.start_index_map)
            ));
            a.push(format!("index_vector_dim={}", g.index_vector_dim));
        }
        if !ins.gather_slice_sizes.is_empty() {
            a.push(format!(
                "slice_sizes={{{}}}",
                join_i64(&ins.gather_slice_sizes)
            ));
        }
        if let Some(s) = &ins.scatter_dimension_numbers {
            a.push(format!(
                "update_window_dims={{{}}}",
                join_i64(&s.update_window_dims)
            ));
            a.push(format!(
                "inserted_window_dims={{{}}}",
                join_i64(&s.inserted_window_dims)
            ));
            a.push(format!(
                "scatter_dims_to_operand_dims={{{}}}",
                join_i64(&s.scatter_dims_to_operand_dims)
            ));
            a.push(format!("index_vector_dim={}", s.index_vector_dim));
        }
        if ins.indices_are_sorted {
            a.push("indices_are_sorted=true".into());
        }
        if ins.unique_indices {
            a.push("unique_indices=true".into());
        }
        if !ins.comparison_direction.is_empty() {
            a.push(format!("direction={}", ins.comparison_direction));
        }
        if !ins.comparison_type.is_empty() {
            a.push(format!("type={}", ins.comparison_type));
        }
        if op == "reduce-precision" {
            a.push(format!("exponent_bits={}", ins.exponent_bits));
            a.push(format!("mantissa_bits={}", ins.mantissa_bits));
        }
        if op == "rng-bit-generator" {
            a.push(format!(
                "algorithm={}",
                rng_algorithm_name(ins.rng_algorithm)
            ));
        }
        if op == "rng" {
            a.push(format!(
                "distribution={}",
                if ins.distribution == 2 {
                    "rng_normal"
                } else {
                    "rng_uniform"
                }
            ));
        }
        if ins.is_stable {
            a.push("is_stable=true".into());
        }
        if op == "topk" {
            a.push(format!("k={}", ins.k));
            a.push(format!("largest={}", ins.largest));
        }
        if ins.channel_id != 0 {
            a.push(format!("channel_id={}", ins.channel_id));
        }
        if !ins.replica_groups.is_empty() {
            let g: Vec<String> = ins
                .replica_groups
                .iter()
                .map(|g| format!("{{{}}}", join_i64(&g.replica_ids)))
                .collect();
            a.push(format!("replica_groups={{{}}}", g.join(",")));
        }
        if !ins.source_target_pairs.is_empty() {
            let g: Vec<String> = ins
                .source_target_pairs
                .iter()
                .map(|p| format!("{{{},{}}}", p.source, p.target))
                .collect();
            a.push(format!("source_target_pairs={{{}}}", g.join(",")));
        }
        if ins.use_global_device_ids {
            a.push("use_global_device_ids=true".into());
        }
        if op == "fusion" {
            a.push(format!(
                "kind={}",
                if ins.fusion_kind.is_empty() {
                    "kLoop"
                } else {
                    &ins.fusion_kind
                }
            ));
        }
        // Called computations, with the attribute name XLA uses for the opcode.
        let names: Vec<String> = called.iter().map(|&id| self.comp(id)).collect();
        match (op, names.len()) {
            (_, 0) => {}
            ("while", 2) => {
                // Stored as [body, condition]; printed condition first, like XLA.
                a.push(format!("condition={}", names[1]));
                a.push(format!("body={}", names[0]));
            }
            ("conditional", 2)
                if operand_shapes.first().and_then(|s| *s).is_some_and(|s| {
                    s.element_type == crate::ElementType::Pred.primitive_type()
                }) =>
            {
                a.push(format!("true_computation={}", names[0]));
                a.push(format!("false_computation={}", names[1]));
            }
            ("conditional", _) => a.push(format!("branch_computations={{{}}}", names.join(", "))),
            ("fusion", _) | ("async-start", _) | ("async-update", _) | ("async-done", _) => {
                a.push(format!("calls={}", names.join(", ")))
            }
            ("custom-call", _) => a.push(format!("called_computations={{{}}}", names.join(", "))),
            (_, 1) => a.push(format!("to_apply={}", names[0])),
            _ => a.push(format!("calls={}", names.join(", "))),
        }
        if op == "custom-call" || !ins.custom_call_target.is_empty() {
            a.push(format!(
                "custom_call_target=\"{}\"",
                escape(&ins.custom_call_target)
            ));
            if ins.custom_call_has_side_effect {
                a.push("custom_call_has_side_effect=true".into());
            }
            if ins.custom_call_api_version > 1 {
                a.push(format!(
                    "api_version={}",
                    api_version_name(ins.custom_call_api_version)
                ));
            }
            if !ins.operand_shapes_with_layout.is_empty() {
                let s: Vec<String> = ins
                    .operand_shapes_with_layout
                    .iter()
                    .map(|s| shape_to_string(s, true))
                    .collect();
                a.push(format!("operand_layout_constraints={{{}}}", s.join(", ")));
            }
            if !ins.output_operand_aliasing.is_empty() {
                let idx = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
                let s: Vec<String> = ins
                    .output_operand_aliasing
                    .iter()
                    .map(|a| {
                        format!(
                            "{{{}}}: ({}, {{{}}})",
                            idx(&a.output_shape_index),
                            a.operand_index,
                            idx(&a.operand_shape_index)
                        )
                    })
                    .collect();
                a.push(format!("output_to_operand_aliasing={{{}}}", s.join(", ")));
            }
        }
        if let Some(s) = &ins.sharding {
            a.push(format!("sharding={}", sharding_string(s)));
        }
        if let Some(f) = &ins.frontend_attributes {
            if !f.map.is_empty() {
                let kv: Vec<String> = f
                    .map
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                a.push(format!("frontend_attributes={{{}}}", kv.join(",")));
            }
        }
        if let Some(m) = &ins.metadata {
            let mut parts = Vec::new();
            if !m.op_type.is_empty() {
                parts.push(format!("op_type=\"{}\"", escape(&m.op_type)));
            }
            if !m.op_name.is_empty() {
                parts.push(format!("op_name=\"{}\"", escape(&m.op_name)));
            }
            if !m.source_file.is_empty() {
                parts.push(format!("source_file=\"{}\"", escape(&m.source_file)));
            }
            if m.source_line != 0 {
                parts.push(format!("source_line={}", m.source_line));
            }
            if !parts.is_empty() {
                a.push(format!("metadata={{{}}}", parts.join(" ")));
            }
        }
        if !ins.backend_config.is_empty() {
            a.push(format!(
                "backend_config=\"{}\"",
                escape(&String::from_utf8_lossy(&ins.backend_config))
            ));
        }
        a
    }

    fn computation(&self, out: &mut String, c: &HloComputationProto, is_entry: bool) {
        let by_id: HashMap<i64, &HloInstructionProto> =
            c.instructions.iter().map(|i| (i.id, i)).collect();
        let mut params: Vec<&HloInstructionProto> = c
            .instructions
            .iter()
            .filter(|i| i.opcode == "parameter")
            .collect();
        params.sort_by_key(|p| p.parameter_number);
        let header: Vec<String> = params
            .iter()
            .map(|p| {
                format!(
                    "{}: {}",
                    p.name,
                    p.shape
                        .as_ref()
                        .map(|s| shape_to_string(s, false))
                        .unwrap_or_default()
                )
            })
            .collect();
        let root_shape = by_id
            .get(&c.root_id)
            .and_then(|r| r.shape.as_ref())
            .or_else(|| c.program_shape.as_ref().and_then(|p| p.result.as_ref()))
            .map(|s| shape_to_string(s, false))
            .unwrap_or_else(|| "()".into());
        let _ = writeln!(
            out,
            "{}%{} ({}) -> {} {{",
            if is_entry { "ENTRY " } else { "" },
            c.name,
            header.join(", "),
            root_shape
        );
        for ins in &c.instructions {
            let shape = ins
                .shape
                .as_ref()
                .map(|s| shape_to_string(s, true))
                .unwrap_or_else(|| "()".into());
            let operand_shapes: Vec<Option<&ShapeProto>> = ins
                .operand_ids
                .iter()
                .map(|id| by_id.get(id).and_then(|o| o.shape.as_ref()))
                .collect();
            let args = match ins.opcode.as_str() {
                "parameter" => ins.parameter_number.to_string(),
                "constant" => literal_string(ins.literal.as_ref(), ins.shape.as_ref()),
                _ => ins
                    .operand_ids
                    .iter()
                    .map(|id| match by_id.get(id) {
                        Some(o) => format!(
                            "{} %{}",
                            o.shape
                                .as_ref()
                                .map(|s| shape_to_string(s, true))
                                .unwrap_or_default(),
                            o.name
                        ),
                        None => format!("%<instruction {id}>"),
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
            };
            let mut line = format!(
                "  {}%{} = {} {}({})",
                if ins.id == c.root_id { "ROOT " } else { "" },
                ins.name,
                shape,
                ins.opcode,
                args
            );
            let attrs = self.attrs(ins, &operand_shapes);
            if !attrs.is_empty() {
                line.push_str(", ");
                line.push_str(&attrs.join(", "));
            }
            if !ins.control_predecessor_ids.is_empty() {
                let preds: Vec<String> = ins
                    .control_predecessor_ids
                    .iter()
                    .map(|id| {
                        by_id
                            .get(id)
                            .map(|o| format!("%{}", o.name))
                            .unwrap_or_else(|| format!("%<{id}>"))
                    })
                    .collect();
                let _ = write!(line, ", control-predecessors={{{}}}", preds.join(", "));
            }
            out.push_str(&line);
            out.push('\n');
        }
        out.push_str("}\n");
    }
}

/// Print any `HloModuleProto` as XLA HLO text.
pub fn print_module(m: &HloModuleProto) -> String {
    let mut out = String::new();
    let entry = m.entry_computation();
    let ps = m
        .host_program_shape
        .as_ref()
        .or_else(|| entry.and_then(|e| e.program_shape.as_ref()));
    let _ = write!(out, "HloModule {}", m.name);
    if let Some(a) = m
        .input_output_alias
        .as_ref()
        .filter(|a| !a.entries.is_empty())
    {
        let idx = |v: &[i64]| v.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
        let entries: Vec<String> = a
            .entries
            .iter()
            .map(|e| {
                let kind = if e.kind == 2 {
                    "must-alias"
                } else {
                    "may-alias"
                };
                format!(
                    "{{{}}}: ({}, {{{}}}, {kind})",
                    idx(&e.output_shape_index),
                    e.parameter_number,
                    idx(&e.parameter_shape_index)
                )
            })
            .collect();
        let _ = write!(out, ", input_output_alias={{ {} }}", entries.join(", "));
    }
    if let Some(ps) = ps {
        let _ = write!(
            out,
            ", entry_computation_layout={{{}}}",
            program_shape_string(ps)
        );
    }
    out.push_str("\n\n");
    let ctx = Ctx {
        comp_names: m
            .computations
            .iter()
            .map(|c| (c.id, c.name.as_str()))
            .collect(),
    };
    for (i, c) in m.computations.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let is_entry = entry.is_some_and(|e| std::ptr::eq(e, c));
        ctx.computation(&mut out, c, is_entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_odd_modules_do_not_panic() {
        assert_eq!(print_module(&HloModuleProto::default()), "HloModule \n\n");
        let m = HloModuleProto {
            name: "m".into(),
            computations: vec![HloComputationProto {
                name: "c".into(),
                id: 3,
                root_id: 9,
                instructions: vec![HloInstructionProto {
                    name: "weird.9".into(),
                    opcode: "my-new-op".into(),
                    id: 9,
                    operand_ids: vec![42],
                    called_computation_ids: vec![77],
                    dimensions: vec![1],
                    literal: Some(LiteralProto::default()),
                    shape: Some(ShapeProto {
                        element_type: 99,
                        dimensions: vec![2],
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = print_module(&m);
        assert!(t.contains("ROOT %weird.9 = type99[2] my-new-op(%<instruction 42>), dimensions={1}, to_apply=%<computation 77>"), "{t}");
    }

    #[test]
    fn literals() {
        let l = LiteralProto {
            f32s: vec![1.0, 2.5, -0.0, 4.0],
            shape: Some(ShapeProto {
                element_type: 11,
                dimensions: vec![2, 2],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(literal_string(Some(&l), None), "{ {1, 2.5}, {-0, 4} }");
        let s = LiteralProto {
            preds: vec![true],
            shape: Some(ShapeProto {
                element_type: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(literal_string(Some(&s), None), "true");
    }
}
