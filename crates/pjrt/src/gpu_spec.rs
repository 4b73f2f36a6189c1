//! GPU target specs (`stream_executor.GpuTargetConfigProto` in protobuf text format, XLA's
//! `gpu_specs/*.txtpb`): the check that a spec is complete enough to compile against, and the
//! small text-format reader it needs.

use crate::error::{Error, Result};

/// Fields of `gpu_device_info` that must be present and positive: the CUDA plugin divides by
/// some of them, and a spec without them kills the process (SIGFPE) at compile time.
const GPU_REQUIRED_FIELDS: &[&str] = &[
    "threads_per_block_limit",
    "threads_per_warp",
    "shared_memory_per_block",
    "shared_memory_per_block_optin",
    "shared_memory_per_core",
    "threads_per_core_limit",
    "core_count",
    "fpus_per_core",
    "block_dim_limit_x",
    "block_dim_limit_y",
    "block_dim_limit_z",
    "memory_bandwidth",
    "l2_cache_size",
    "clock_rate_ghz",
    "device_memory_size",
    "registers_per_core_limit",
    "registers_per_block_limit",
];

/// What [`validate_gpu_spec`] learned from a spec.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuSpecSummary {
    /// `device_description_str`, e.g. `"NVIDIA H100 80GB HBM3"` (empty if absent).
    pub device: String,
    /// `cuda_compute_capability` `(major, minor)`.
    pub compute_capability: (i64, i64),
    /// Streaming multiprocessors (`core_count`).
    pub core_count: i64,
    /// `device_memory_size` in bytes.
    pub device_memory_size: i64,
    /// `runtime_version.major` (the CUDA major version), if given.
    pub runtime_major: Option<i64>,
}

/// Checks that a text `GpuTargetConfigProto` is complete enough to compile against: it parses,
/// `platform_name` is `"CUDA"`, and `gpu_device_info` has every field the compiler divides by,
/// with positive values, plus `cuda_compute_capability.major`. An incomplete spec is accepted by
/// the plugin's topology call and then kills the process with SIGFPE during compilation.
pub fn validate_gpu_spec(text: &str) -> Result<GpuSpecSummary> {
    use textproto::Value;
    let bad = |why: String| Error::InvalidArgument(format!("GPU target spec: {why}"));
    let fields = textproto::parse(text).map_err(|e| bad(format!("not valid text format: {e}")))?;
    let find = |fields: &'_ [(String, Value)], name: &str| -> Option<Value> {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    match find(&fields, "platform_name") {
        Some(Value::Scalar(s)) if s == "CUDA" => {}
        Some(other) => {
            return Err(bad(format!(
                "platform_name is {other:?}; the CUDA plugin needs \"CUDA\""
            )))
        }
        None => return Err(bad("platform_name: \"CUDA\" is missing".into())),
    }
    let Some(Value::Message(info)) = find(&fields, "gpu_device_info") else {
        return Err(bad(
            "gpu_device_info { ... } is missing (compiling without it kills the process with SIGFPE)".into(),
        ));
    };
    let number = |fields: &[(String, Value)], name: &str| -> Option<f64> {
        match find(fields, name)? {
            Value::Scalar(s) => s.parse::<f64>().ok(),
            Value::Message(_) => None,
        }
    };
    let mut missing: Vec<String> = GPU_REQUIRED_FIELDS
        .iter()
        .filter(|f| !number(&info, f).is_some_and(|v| v > 0.0))
        .map(|f| f.to_string())
        .collect();
    let cc = match find(&info, "cuda_compute_capability") {
        Some(Value::Message(cc)) => {
            let major = number(&cc, "major").unwrap_or(0.0) as i64;
            let minor = number(&cc, "minor").unwrap_or(0.0) as i64;
            (major, minor)
        }
        _ => (0, 0),
    };
    if cc.0 <= 0 {
        missing.push("cuda_compute_capability.major".into());
    }
    if !missing.is_empty() {
        return Err(bad(format!(
            "gpu_device_info lacks or has non-positive {} (the CUDA plugin would crash on it); start from a \
             complete spec such as pjrt::gpu::H100_SXM",
            missing.join(", ")
        )));
    }
    let runtime_major = match find(&fields, "runtime_version") {
        Some(Value::Message(rv)) => number(&rv, "major").map(|v| v as i64),
        _ => None,
    };
    let device = match find(&fields, "device_description_str") {
        Some(Value::Scalar(s)) => s,
        _ => String::new(),
    };
    Ok(GpuSpecSummary {
        device,
        compute_capability: cc,
        core_count: number(&info, "core_count").unwrap_or(0.0) as i64,
        device_memory_size: number(&info, "device_memory_size").unwrap_or(0.0) as i64,
        runtime_major,
    })
}

/// A minimal protobuf text-format reader: fields, nested messages and scalars (enough to check
/// a `GpuTargetConfigProto`; repeated-list syntax `[...]` is refused).
mod textproto {
    /// A field value.
    #[derive(Debug, Clone, PartialEq)]
    pub(crate) enum Value {
        /// A number, identifier or (unquoted) string.
        Scalar(String),
        /// A nested message.
        Message(Vec<(String, Value)>),
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Token {
        Word(String),
        Str(String),
        Open,
        Close,
        Colon,
    }

    fn tokenize(text: &str) -> Result<Vec<(Token, usize)>, String> {
        let mut out = Vec::new();
        let mut chars = text.chars().peekable();
        let mut line = 1;
        while let Some(c) = chars.next() {
            match c {
                '\n' => line += 1,
                c if c.is_whitespace() || c == ',' || c == ';' => {}
                '#' => {
                    for c in chars.by_ref() {
                        if c == '\n' {
                            line += 1;
                            break;
                        }
                    }
                }
                '{' | '<' => out.push((Token::Open, line)),
                '}' | '>' => out.push((Token::Close, line)),
                ':' => out.push((Token::Colon, line)),
                '"' | '\'' => {
                    let mut s = String::new();
                    loop {
                        match chars.next() {
                            None => return Err(format!("line {line}: unterminated string")),
                            Some('\\') => match chars.next() {
                                Some('n') => s.push('\n'),
                                Some('t') => s.push('\t'),
                                Some(other) => s.push(other),
                                None => return Err(format!("line {line}: unterminated string")),
                            },
                            Some(q) if q == c => break,
                            Some('\n') => return Err(format!("line {line}: newline in string")),
                            Some(other) => s.push(other),
                        }
                    }
                    out.push((Token::Str(s), line));
                }
                c if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '+' || c == '.' => {
                    let mut w = String::from(c);
                    while let Some(&n) = chars.peek() {
                        if n.is_ascii_alphanumeric() || n == '_' || n == '-' || n == '+' || n == '.'
                        {
                            w.push(n);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                    out.push((Token::Word(w), line));
                }
                other => return Err(format!("line {line}: unexpected character {other:?}")),
            }
        }
        Ok(out)
    }

    fn parse_fields(
        tokens: &[(Token, usize)],
        pos: &mut usize,
        nested: bool,
    ) -> Result<Vec<(String, Value)>, String> {
        let mut fields = Vec::new();
        loop {
            let Some((tok, line)) = tokens.get(*pos) else {
                return if nested {
                    Err("unclosed '{' at end of input".into())
                } else {
                    Ok(fields)
                };
            };
            let name = match tok {
                Token::Close if nested => {
                    *pos += 1;
                    return Ok(fields);
                }
                Token::Word(w) => w.clone(),
                other => {
                    return Err(format!(
                        "line {line}: expected a field name, found {other:?}"
                    ))
                }
            };
            *pos += 1;
            if matches!(tokens.get(*pos), Some((Token::Colon, _))) {
                *pos += 1;
            }
            match tokens.get(*pos) {
                Some((Token::Open, _)) => {
                    *pos += 1;
                    let inner = parse_fields(tokens, pos, true)?;
                    fields.push((name, Value::Message(inner)));
                }
                Some((Token::Word(w), _)) => {
                    *pos += 1;
                    fields.push((name, Value::Scalar(w.clone())));
                }
                Some((Token::Str(s), _)) => {
                    *pos += 1;
                    let mut s = s.clone();
                    // Adjacent string literals concatenate.
                    while let Some((Token::Str(more), _)) = tokens.get(*pos) {
                        s.push_str(more);
                        *pos += 1;
                    }
                    fields.push((name, Value::Scalar(s)));
                }
                Some((other, l)) => {
                    return Err(format!(
                        "line {l}: field {name:?} has no value (found {other:?})"
                    ))
                }
                None => return Err(format!("line {line}: field {name:?} has no value")),
            }
        }
    }

    /// Parses text-format fields.
    pub(crate) fn parse(text: &str) -> Result<Vec<(String, Value)>, String> {
        let tokens = tokenize(text)?;
        let mut pos = 0;
        parse_fields(&tokens, &mut pos, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::H100_SXM;

    #[test]
    fn incomplete_specs_are_refused_with_the_missing_fields() {
        let only_platform = "platform_name: \"CUDA\"";
        let e = validate_gpu_spec(only_platform).unwrap_err().to_string();
        assert!(e.contains("gpu_device_info"), "{e}");
        let no_warp = H100_SXM.replace("threads_per_warp: 32", "");
        let e = validate_gpu_spec(&no_warp).unwrap_err().to_string();
        assert!(e.contains("threads_per_warp"), "{e}");
        let zero_cores = H100_SXM.replace("core_count: 132", "core_count: 0");
        let e = validate_gpu_spec(&zero_cores).unwrap_err().to_string();
        assert!(e.contains("core_count"), "{e}");
        let no_cc = H100_SXM.replace("cuda_compute_capability { major: 9 }", "");
        let e = validate_gpu_spec(&no_cc).unwrap_err().to_string();
        assert!(e.contains("cuda_compute_capability.major"), "{e}");
        let rocm = H100_SXM.replace("\"CUDA\"", "\"ROCM\"");
        assert!(validate_gpu_spec(&rocm).is_err());
        assert!(validate_gpu_spec("gpu_device_info { core_count: 1").is_err());
        assert!(validate_gpu_spec("gpu_device_info { core_count: [1, 2] }").is_err());
    }

    #[test]
    fn textproto_handles_comments_and_inline_messages() {
        use textproto::Value;
        let v = textproto::parse("# c\na { b: 1 c < d: \"x\" 'y' > }\ne: -2.5e3").unwrap();
        assert_eq!(
            v,
            vec![
                (
                    "a".into(),
                    Value::Message(vec![
                        ("b".into(), Value::Scalar("1".into())),
                        (
                            "c".into(),
                            Value::Message(vec![("d".into(), Value::Scalar("xy".into()))])
                        ),
                    ])
                ),
                ("e".into(), Value::Scalar("-2.5e3".into())),
            ]
        );
    }
}
