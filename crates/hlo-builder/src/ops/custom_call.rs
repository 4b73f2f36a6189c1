//! Typed-FFI custom calls (`custom_call_api_version = 4`) with attributes passed as an MLIR
//! dictionary in `backend_config`, which XLA decodes into FFI attributes.
//!
//! A custom call is opaque to autodiff: give the block a [`Builder::custom_vjp`].

use std::panic::Location;

use crate::autodiff::{Ct, Node};
use crate::builder::Builder;
use crate::error::Result;
use crate::ops::{Family, Kind};
use crate::proto;
use crate::shape::{Shape, ShapeError};
use crate::Op;

/// A custom-call attribute value (decoded by XLA FFI as scalar, string or array).
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    /// `i32` scalar.
    I32(i32),
    /// `i64` scalar.
    I64(i64),
    /// `f32` scalar.
    F32(f32),
    /// `f64` scalar.
    F64(f64),
    /// Boolean (`i1`).
    Bool(bool),
    /// String.
    Str(String),
    /// Dense `i64` array.
    I64Array(Vec<i64>),
    /// Dense `f32` array.
    F32Array(Vec<f32>),
}

/// A float in the style MLIR prints (`2.000000e+00`), with enough digits to round-trip.
fn mlir_float(v: f64, is_f32: bool) -> String {
    if v.is_nan() {
        return if is_f32 {
            "0x7FC00000".into()
        } else {
            "0x7FF8000000000000".into()
        };
    }
    if v.is_infinite() {
        let bits = match (is_f32, v > 0.0) {
            (true, true) => "0x7F800000",
            (true, false) => "0xFF800000",
            (false, true) => "0x7FF0000000000000",
            (false, false) => "0xFFF0000000000000",
        };
        return bits.into();
    }
    let roundtrips = |s: &str| {
        if is_f32 {
            s.parse::<f32>().ok() == Some(v as f32)
        } else {
            s.parse::<f64>().ok() == Some(v)
        }
    };
    let digits = [6usize, 8, 16]
        .into_iter()
        .find(|&p| roundtrips(&format!("{v:.p$e}")))
        .unwrap_or(16);
    let s = format!("{v:.digits$e}");
    // Rust prints `2.000000e0`; MLIR / C print `2.000000e+00`.
    match s.split_once('e') {
        Some((m, e)) => {
            let exp: i32 = e.parse().unwrap_or(0);
            format!("{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
        }
        None => s,
    }
}

fn mlir_string(s: &str) -> String {
    let mut out = String::from("\"");
    for b in s.bytes() {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(b as char),
            _ => out.push_str(&format!("\\{b:02X}")),
        }
    }
    out.push('"');
    out
}

impl Attr {
    /// The MLIR attribute syntax of the value (`512 : i64`, `"softmax"`, `array<i64: 1, 2>`).
    pub fn to_mlir(&self) -> String {
        match self {
            Attr::I32(v) => format!("{v} : i32"),
            Attr::I64(v) => format!("{v} : i64"),
            Attr::F32(v) => format!("{} : f32", mlir_float(f64::from(*v), true)),
            Attr::F64(v) => format!("{} : f64", mlir_float(*v, false)),
            Attr::Bool(v) => v.to_string(),
            Attr::Str(s) => mlir_string(s),
            Attr::I64Array(v) => format!(
                "array<i64{}{}>",
                if v.is_empty() { "" } else { ": " },
                v.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
            ),
            Attr::F32Array(v) => {
                format!(
                    "array<f32{}{}>",
                    if v.is_empty() { "" } else { ": " },
                    v.iter()
                        .map(|x| mlir_float(f64::from(*x), true))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        }
    }
}

/// The MLIR dictionary string of `attrs`, sorted by name as MLIR requires:
/// `{chunk = 512 : i64, feature_map = "softmax", scale = 2.000000e+00 : f32}`.
pub fn mlir_dictionary(attrs: &[(&str, Attr)]) -> Result<String, ShapeError> {
    let mut sorted: Vec<&(&str, Attr)> = attrs.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    for w in sorted.windows(2) {
        if w[0].0 == w[1].0 {
            return Err(ShapeError::new(
                "custom_call",
                format!("attribute `{}` given twice", w[0].0),
            ));
        }
    }
    for (name, _) in &sorted {
        let ok = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '$');
        if !ok {
            return Err(ShapeError::new(
                "custom_call",
                format!("attribute name `{name}` is not a bare MLIR identifier"),
            ));
        }
    }
    let body: Vec<String> = sorted
        .iter()
        .map(|(n, a)| format!("{n} = {}", a.to_mlir()))
        .collect();
    Ok(format!("{{{}}}", body.join(", ")))
}

impl Builder {
    /// A typed-FFI custom call of `target` producing `result` (array or tuple of arrays), its
    /// operand and result layouts constrained to row-major (`constrain_layout`,
    /// `operand_shapes_with_layout`): an FFI handler sees dims but no layout, and XLA's layout
    /// assignment, left free, hands a call transposed operands where that saves it a copy (it
    /// did, to the RLA kernels under one mesh and to the Triton kernels on a GPU). The handler
    /// must be registered with the runtime (a missing one is a compile error).
    #[track_caller]
    pub fn custom_call(
        &self,
        target: &str,
        operands: &[Op],
        result: Shape,
        attrs: &[(&str, Attr)],
    ) -> Result<Op> {
        self.typed_ffi_call(Location::caller(), target, operands, result, attrs, &[])
    }

    /// [`Builder::custom_call`] whose results update operands in place
    /// (`output_operand_aliasing`): each `(output, operand)` pair gives result `output` (the
    /// tuple element of a tuple result; 0 for an array result) the buffer of operand `operand`,
    /// which must have the same shape. The handler reaches such a pair through
    /// `pjrt::ffi::CallFrame::in_place_mut`. Errors name the pair whose shapes differ or whose
    /// index is out of range or repeated.
    #[track_caller]
    pub fn custom_call_in_place(
        &self,
        target: &str,
        operands: &[Op],
        result: Shape,
        attrs: &[(&str, Attr)],
        aliases: &[(usize, usize)],
    ) -> Result<Op> {
        self.typed_ffi_call(Location::caller(), target, operands, result, attrs, aliases)
    }

    fn typed_ffi_call(
        &self,
        loc: &'static Location<'static>,
        target: &str,
        operands: &[Op],
        result: Shape,
        attrs: &[(&str, Attr)],
        aliases: &[(usize, usize)],
    ) -> Result<Op> {
        let shapes = self.shapes_of(loc, "custom_call", operands)?;
        if target.is_empty() {
            return Err(self.error_at(loc, "custom_call", "empty target name"));
        }
        let backend_config = mlir_dictionary(attrs).map_err(|e| self.shape_err(loc, e))?;
        let output_operand_aliases =
            check_aliases(target, &shapes, &result, aliases).map_err(|e| self.shape_err(loc, e))?;
        let row_major_operands = shapes;
        let call = CustomCall {
            target: target.to_string(),
            backend_config,
            has_side_effect: false,
            api_version: 4,
            row_major_operands,
            output_operand_aliases,
        };
        Ok(self.push(
            loc,
            Kind::CustomCall(call),
            operands.to_vec(),
            result,
            Vec::new(),
        ))
    }

    /// A custom call of `target` whose `backend_config` is passed verbatim (not an FFI
    /// attribute dictionary), with the given `custom_call_api_version` (1 = original, what
    /// `tpu_custom_call` uses; its config is JSON). For back-end kernels such as Mosaic's, which
    /// index their operands in row-major order: the operand and result layouts are constrained
    /// to row-major (`constrain_layout`), so XLA's layout assignment cannot transpose them.
    #[track_caller]
    pub fn custom_call_with_config(
        &self,
        target: &str,
        operands: &[Op],
        result: Shape,
        backend_config: &str,
        api_version: i32,
    ) -> Result<Op> {
        let loc = Location::caller();
        let shapes = self.shapes_of(loc, "custom_call", operands)?;
        if target.is_empty() || !(1..=4).contains(&api_version) {
            return Err(self.error_at(
                loc,
                "custom_call",
                format!("need a target name and api_version 1..=4, got {target:?}, {api_version}"),
            ));
        }
        let call = CustomCall {
            target: target.to_string(),
            backend_config: backend_config.to_string(),
            has_side_effect: false,
            api_version,
            row_major_operands: shapes,
            output_operand_aliases: Vec::new(),
        };
        Ok(self.push(
            loc,
            Kind::CustomCall(call),
            operands.to_vec(),
            result,
            Vec::new(),
        ))
    }
}

/// Checks `(output, operand)` alias pairs against the operand and result shapes; returns them as
/// `(output shape index, operand)` (the index empty for an array result).
fn check_aliases(
    target: &str,
    operands: &[Shape],
    result: &Shape,
    aliases: &[(usize, usize)],
) -> std::result::Result<Vec<(Vec<i64>, usize)>, ShapeError> {
    let err = |m: String| ShapeError::new("custom_call", format!("`{target}`: {m}"));
    let mut out = Vec::with_capacity(aliases.len());
    for (k, &(o, i)) in aliases.iter().enumerate() {
        if aliases[..k].iter().any(|&(o2, i2)| o2 == o || i2 == i) {
            return Err(err(format!(
                "alias (output {o}, operand {i}) repeats an output or operand"
            )));
        }
        let operand = operands.get(i).ok_or_else(|| {
            err(format!(
                "alias (output {o}, operand {i}): the call has {} operands",
                operands.len()
            ))
        })?;
        let (out_shape, index) = match result.tuple_elements() {
            Some(elems) => (
                elems.get(o).ok_or_else(|| {
                    err(format!(
                        "alias (output {o}, operand {i}): the result has {} elements",
                        elems.len()
                    ))
                })?,
                vec![o as i64],
            ),
            None if o == 0 => (result, Vec::new()),
            None => {
                return Err(err(format!(
                    "alias (output {o}, operand {i}): the result is one array (output 0)"
                )))
            }
        };
        if !operand.is_array() || out_shape != operand {
            return Err(err(format!(
                "alias (output {o}, operand {i}): output {} and operand {} must be one array shape",
                out_shape.short(),
                operand.short()
            )));
        }
        out.push((index, i));
    }
    Ok(out)
}

/// Attributes of a typed-FFI `custom-call`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CustomCall {
    /// The registered handler's name.
    pub(crate) target: String,
    /// The attributes as an MLIR dictionary ([`mlir_dictionary`]).
    pub(crate) backend_config: String,
    pub(crate) has_side_effect: bool,
    /// `custom_call_api_version` (4 = typed FFI).
    pub(crate) api_version: i32,
    /// When non-empty: the operand shapes, whose row-major layouts (and the result's) are
    /// constrained.
    pub(crate) row_major_operands: Vec<Shape>,
    /// `output_operand_aliasing`: (output shape index, operand) pairs.
    pub(crate) output_operand_aliases: Vec<(Vec<i64>, usize)>,
}

impl Family for CustomCall {
    fn opcode(&self) -> &'static str {
        "custom-call"
    }

    fn emit(&self, p: &mut proto::HloInstructionProto) {
        p.custom_call_target = self.target.clone();
        p.backend_config = self.backend_config.as_bytes().to_vec();
        p.custom_call_api_version = self.api_version;
        p.custom_call_has_side_effect = self.has_side_effect;
        if !self.row_major_operands.is_empty() {
            p.constrain_layout = true;
            p.operand_shapes_with_layout = self
                .row_major_operands
                .iter()
                .map(Shape::to_proto)
                .collect();
        }
        p.output_operand_aliasing = self
            .output_operand_aliases
            .iter()
            .map(|(index, operand)| proto::OutputOperandAliasing {
                output_shape_index: index.clone(),
                operand_index: *operand as i64,
                operand_shape_index: Vec::new(),
            })
            .collect();
    }

    fn vjp(&self, b: &Builder, n: &Node, _ct: Ct) -> Result<Vec<Option<Ct>>> {
        Err(n.not_differentiable(
            b,
            &format!(
                "custom-call `{}` (target {:?}, built at {})",
                n.full_name, self.target, n.built_at
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_format() {
        let d = mlir_dictionary(&[
            ("scale", Attr::F32(2.0)),
            ("feature_map", Attr::Str("softmax".into())),
            ("chunk", Attr::I64(512)),
        ])
        .unwrap();
        assert_eq!(
            d,
            "{chunk = 512 : i64, feature_map = \"softmax\", scale = 2.000000e+00 : f32}"
        );
        assert_eq!(Attr::F32(0.1).to_mlir(), "1.000000e-01 : f32");
        // 6 digits do not round-trip this f64, so more are printed.
        let s = Attr::F64(0.1234567891).to_mlir();
        let mantissa = s.trim_end_matches(" : f64");
        assert_eq!(mantissa.parse::<f64>().unwrap(), 0.1234567891, "{s}");
        assert!(mantissa.len() > "1.234568e-01".len(), "{s}");
        assert_eq!(Attr::F32(1.0e10).to_mlir(), "1.000000e+10 : f32");
        assert_eq!(Attr::F64(-1.5e-7).to_mlir(), "-1.500000e-07 : f64");
        assert_eq!(Attr::I64Array(vec![1, 2]).to_mlir(), "array<i64: 1, 2>");
        assert_eq!(Attr::Str("a\"b".into()).to_mlir(), "\"a\\\"b\"");
        assert!(mlir_dictionary(&[("a", Attr::I32(1)), ("a", Attr::I32(2))]).is_err());
        assert!(mlir_dictionary(&[("bad name", Attr::I32(1))]).is_err());
        assert_eq!(mlir_dictionary(&[]).unwrap(), "{}");
    }

    /// The last custom-call instruction of the graph `b` builds for `root`.
    fn last_custom_call(b: &Builder, root: Op) -> proto::HloInstructionProto {
        let m = b.build(root).unwrap().to_proto();
        m.computations[0]
            .instructions
            .iter()
            .rfind(|i| i.opcode == "custom-call")
            .cloned()
            .unwrap()
    }

    #[test]
    fn in_place_call_emits_output_operand_aliasing() {
        use crate::ElementType::F32;
        let b = Builder::new("in_place");
        let x = b.parameter(Shape::array(F32, &[3]), "x").unwrap();
        let y = b.parameter(Shape::array(F32, &[2, 2]), "y").unwrap();
        let out = Shape::tuple(vec![Shape::array(F32, &[2, 2]), Shape::array(F32, &[3])]);
        let c = b
            .custom_call_in_place("t", &[x, y], out, &[], &[(0, 1), (1, 0)])
            .unwrap();
        let ins = last_custom_call(&b, c);
        let got: Vec<(Vec<i64>, i64, Vec<i64>)> = ins
            .output_operand_aliasing
            .iter()
            .map(|a| {
                (
                    a.output_shape_index.clone(),
                    a.operand_index,
                    a.operand_shape_index.clone(),
                )
            })
            .collect();
        assert_eq!(got, vec![(vec![0], 1, vec![]), (vec![1], 0, vec![])]);
        assert!(ins.constrain_layout);
        // An array result aliases as output 0 with an empty shape index; a dtype mismatch is
        // refused naming the pair.
        let a = b
            .custom_call_in_place("t", &[x], Shape::array(F32, &[3]), &[], &[(0, 0)])
            .unwrap();
        let ins = last_custom_call(&b, a);
        assert_eq!(
            ins.output_operand_aliasing[0].output_shape_index,
            Vec::<i64>::new()
        );
        let e = b
            .custom_call_in_place(
                "t",
                &[x],
                Shape::array(crate::ElementType::F64, &[3]),
                &[],
                &[(0, 0)],
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("custom_call") && e.contains("(output 0, operand 0)"),
            "{e}"
        );
    }
}
