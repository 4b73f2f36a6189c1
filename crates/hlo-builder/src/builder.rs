//! The graph builder: [`Builder`], op handles ([`Op`]), built [`Computation`]s and proto emission.
//! Emission here writes the fields every instruction has; each op family (`crate::ops`) writes
//! its own opcode and attributes.
//!
//! Instructions are stored in creation order (a topological order) as [`Instr`] records whose
//! fields are readable from the rest of the crate (autodiff walks them). Ids come from one
//! counter per module, so they are unique across all computations of the module.

use std::collections::HashMap;
use std::panic::Location;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, Result};
use crate::ops::constant::Leaf;
use crate::ops::elementwise::BinaryOp;
use crate::ops::Kind;
use crate::proto;
use crate::shape::Shape;
use crate::sharding::Sharding;

static NEXT_BUILDER: AtomicU32 = AtomicU32::new(1);

/// A cheap, copyable handle to an instruction of one [`Builder`].
///
/// Using an `Op` with a builder other than the one that made it is an error (not a panic).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Op {
    pub(crate) idx: u32,
    pub(crate) builder: u32,
}

impl Op {
    /// Position of the instruction in its builder (creation order).
    pub fn index(self) -> usize {
        self.idx as usize
    }
}

/// One instruction of a computation under construction or built.
#[derive(Debug, Clone)]
pub(crate) struct Instr {
    /// Module-unique, non-zero id.
    pub(crate) id: i64,
    /// Opcode and attributes.
    pub(crate) kind: Kind,
    /// Operands, all from the same builder.
    pub(crate) operands: Vec<Op>,
    /// Result shape.
    pub(crate) shape: Shape,
    /// Ids of called computations (reducer, condition + body, branches, callee).
    pub(crate) called: Vec<i64>,
    /// User-given base name (parameters); otherwise the opcode is used.
    pub(crate) name: Option<Box<str>>,
    /// Name scope active when the instruction was made.
    pub(crate) scope: Arc<str>,
    /// Rust caller of the builder method.
    pub(crate) location: &'static Location<'static>,
    /// Optional sharding annotation.
    pub(crate) sharding: Option<Sharding>,
}

impl Instr {
    /// The instruction's unique name: `<base>.<id>`.
    pub(crate) fn full_name(&self) -> String {
        let base = self.name.as_deref().unwrap_or(self.kind.opcode());
        format!("{base}.{}", self.id)
    }

    fn metadata(&self, full_name: &str) -> proto::OpMetadata {
        let op_name = match (self.kind.is_parameter(), self.name.as_deref()) {
            (true, Some(n)) if self.scope.is_empty() => n.to_string(),
            (true, Some(n)) => format!("{}/{n}", self.scope),
            _ if self.scope.is_empty() => full_name.to_string(),
            _ => format!("{}/{full_name}", self.scope),
        };
        proto::OpMetadata {
            op_type: self.kind.opcode().to_string(),
            op_name,
            source_file: self.location.file().to_string(),
            source_line: self.location.line() as i32,
            ..Default::default()
        }
    }
}

/// A computation after [`Builder::build`].
#[derive(Debug)]
pub(crate) struct CompData {
    pub(crate) id: i64,
    pub(crate) name: String,
    pub(crate) instrs: Vec<Instr>,
    pub(crate) root: usize,
    /// Instruction index of each parameter, by parameter number.
    pub(crate) params: Vec<usize>,
    pub(crate) builder: u32,
}

impl CompData {
    pub(crate) fn param_shapes(&self) -> Vec<Shape> {
        self.params
            .iter()
            .map(|&i| self.instrs[i].shape.clone())
            .collect()
    }

    pub(crate) fn result_shape(&self) -> &Shape {
        &self.instrs[self.root].shape
    }

    fn program_shape_proto(&self) -> proto::ProgramShapeProto {
        proto::ProgramShapeProto {
            parameters: self
                .params
                .iter()
                .map(|&i| self.instrs[i].shape.to_proto())
                .collect(),
            result: Some(self.result_shape().to_proto()),
            parameter_names: self
                .params
                .iter()
                .map(|&i| self.instrs[i].name.as_deref().unwrap_or("").to_string())
                .collect(),
        }
    }

    fn to_proto(&self) -> proto::HloComputationProto {
        let names: Vec<String> = self.instrs.iter().map(Instr::full_name).collect();
        let instructions = self
            .instrs
            .iter()
            .zip(&names)
            .map(|(ins, name)| {
                let mut p = proto::HloInstructionProto {
                    name: name.clone(),
                    opcode: ins.kind.opcode().to_string(),
                    shape: Some(ins.shape.to_proto()),
                    metadata: Some(ins.metadata(name)),
                    id: ins.id,
                    operand_ids: ins
                        .operands
                        .iter()
                        .map(|o| self.instrs[o.index()].id)
                        .collect(),
                    called_computation_ids: ins.called.clone(),
                    sharding: ins.sharding.as_ref().map(Sharding::to_proto),
                    ..Default::default()
                };
                ins.kind.family().emit(&mut p);
                p
            })
            .collect();
        proto::HloComputationProto {
            name: self.name.clone(),
            instructions,
            program_shape: Some(self.program_shape_proto()),
            id: self.id,
            root_id: self.instrs[self.root].id,
            ..Default::default()
        }
    }
}

/// State shared by a builder and all its sub-builders: the id counter and built computations.
#[derive(Debug)]
pub(crate) struct ModuleShared {
    next_id: AtomicI64,
    pub(crate) comps: Mutex<HashMap<i64, Arc<CompData>>>,
    /// Cached scalar reducers (`reduce_sum` etc.) by (binary op, element type): computation id.
    pub(crate) reducers: Mutex<HashMap<(BinaryOp, crate::ElementType), i64>>,
}

impl ModuleShared {
    pub(crate) fn next_id(&self) -> i64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

#[derive(Debug)]
struct State {
    instrs: Vec<Instr>,
    params: Vec<usize>,
    scopes: Vec<Arc<str>>,
    /// Shardings of [`Builder::manual_scope`]s, innermost last: new instructions get the last.
    shardings: Vec<Sharding>,
}

impl State {
    fn scope(&self) -> Arc<str> {
        self.scopes.last().cloned().unwrap_or_else(|| Arc::from(""))
    }
}

/// Builds one HLO computation. All methods take `&self` (interior mutability), so a builder can
/// be shared by reference through model code.
///
/// ```
/// use hlo_builder::{Builder, ElementType, Shape};
/// let b = Builder::new("mlp");
/// let x = b.parameter(Shape::array(ElementType::F32, &[2, 3]), "x").unwrap();
/// let y = b.parameter(Shape::array(ElementType::F32, &[3]), "y").unwrap();
/// let yb = b.broadcast_in_dim(y, &[2, 3], &[1]).unwrap();
/// let z = b.add(x, yb).unwrap();
/// let comp = b.build(z).unwrap();
/// assert!(comp.to_text().contains("add("));
/// ```
#[derive(Debug)]
pub struct Builder {
    pub(crate) uid: u32,
    name: String,
    pub(crate) module: Arc<ModuleShared>,
    state: Mutex<State>,
    /// User VJP rules of [`Builder::custom_vjp`], by output instruction index (autodiff hook).
    pub(crate) custom_vjps: Mutex<HashMap<usize, crate::autodiff::CustomVjp>>,
    /// The dot tape of a [`Builder::checkpoint_with_policy`] block being traced (recording the
    /// dots it saves, or replaying them in the backward pass); `None` outside such blocks.
    pub(crate) dot_tape: Mutex<Option<crate::autodiff::DotTape>>,
}

/// RAII guard of [`Builder::name_scope`]; the scope ends when it is dropped.
#[must_use = "the scope ends when the guard is dropped"]
#[derive(Debug)]
pub struct ScopeGuard<'a> {
    builder: &'a Builder,
}

impl Drop for ScopeGuard<'_> {
    fn drop(&mut self) {
        self.builder.lock().scopes.pop();
    }
}

/// RAII guard of [`Builder::manual_scope`]; the scope ends when it is dropped.
#[must_use = "the scope ends when the guard is dropped"]
#[derive(Debug)]
pub struct ShardingScope<'a> {
    builder: &'a Builder,
}

impl Drop for ShardingScope<'_> {
    fn drop(&mut self) {
        self.builder.lock().shardings.pop();
    }
}

/// Keep XLA-legal name characters (`[A-Za-z0-9_.-]`), replacing others by `_`.
pub(crate) fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "x".to_string()
    } else {
        s
    }
}

impl Builder {
    /// A new builder for the entry computation of a new module named `name`.
    pub fn new(name: &str) -> Builder {
        let module = Arc::new(ModuleShared {
            next_id: AtomicI64::new(1),
            comps: Mutex::new(HashMap::new()),
            reducers: Mutex::new(HashMap::new()),
        });
        Builder::with_module(name, module, Vec::new())
    }

    fn with_module(name: &str, module: Arc<ModuleShared>, scopes: Vec<Arc<str>>) -> Builder {
        Builder {
            uid: NEXT_BUILDER.fetch_add(1, Ordering::Relaxed),
            name: sanitize(name),
            module,
            state: Mutex::new(State {
                instrs: Vec::new(),
                params: Vec::new(),
                scopes,
                shardings: Vec::new(),
            }),
            custom_vjps: Mutex::new(HashMap::new()),
            dot_tape: Mutex::new(None),
        }
    }

    /// A builder for a computation of the same module (while body/condition, reducer, branch,
    /// callee). It starts in this builder's current name scope.
    pub fn sub_builder(&self, name: &str) -> Builder {
        let scope = self.lock().scopes.last().cloned();
        Builder::with_module(name, self.module.clone(), scope.into_iter().collect())
    }

    /// The builder's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-push; the data is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Enter a name scope; ops made while the guard lives get `scope/op` names in their metadata.
    pub fn name_scope(&self, name: &str) -> ScopeGuard<'_> {
        let mut st = self.lock();
        let full: Arc<str> = match st.scopes.last() {
            Some(s) if !s.is_empty() => Arc::from(format!("{s}/{name}")),
            _ => Arc::from(name),
        };
        st.scopes.push(full);
        ScopeGuard { builder: self }
    }

    /// The current name scope (`"layer_3/rla"`, empty at top level).
    pub fn current_scope(&self) -> String {
        self.lock().scope().to_string()
    }

    /// Number of instructions made so far.
    pub fn instruction_count(&self) -> usize {
        self.lock().instrs.len()
    }

    /// Shapes of `ops`, checking they belong to this builder.
    pub(crate) fn shapes_of(
        &self,
        loc: &'static Location<'static>,
        op_name: &'static str,
        ops: &[Op],
    ) -> Result<Vec<Shape>> {
        let st = self.lock();
        ops.iter()
            .enumerate()
            .map(|(i, o)| {
                if o.builder != self.uid || o.index() >= st.instrs.len() {
                    // The state is locked here, so the scope is read from it directly.
                    Err(Error::invalid_at(loc, st.scope().to_string(), op_name, format!("operand {i} does not belong to builder `{}` (it was made by another builder)", self.name)))
                } else {
                    Ok(st.instrs[o.index()].shape.clone())
                }
            })
            .collect()
    }

    /// Shape of one operand, checking it belongs to this builder.
    pub(crate) fn shape_of(
        &self,
        loc: &'static Location<'static>,
        op_name: &'static str,
        op: Op,
    ) -> Result<Shape> {
        Ok(self.shapes_of(loc, op_name, &[op])?.remove(0))
    }

    /// Check that a computation belongs to this builder's module; returns its data.
    pub(crate) fn check_comp<'c>(
        &self,
        loc: &'static Location<'static>,
        op_name: &'static str,
        c: &'c crate::Computation,
    ) -> Result<&'c Arc<CompData>> {
        if !Arc::ptr_eq(&c.module, &self.module) {
            return Err(self.error_at(loc, op_name, format!("computation `{}` belongs to another module; build it with sub_builder of this builder", c.data.name)));
        }
        if c.data.builder == self.uid {
            return Err(self.error_at(
                loc,
                op_name,
                format!("computation `{}` cannot call itself", c.data.name),
            ));
        }
        Ok(&c.data)
    }

    /// Append an instruction whose operands and shape were already validated.
    pub(crate) fn push(
        &self,
        loc: &'static Location<'static>,
        kind: Kind,
        operands: Vec<Op>,
        shape: Shape,
        called: Vec<i64>,
    ) -> Op {
        let id = self.module.next_id();
        let mut st = self.lock();
        let scope = st.scope();
        let idx = st.instrs.len() as u32;
        let sharding = st.shardings.last().map(|s| s.for_shape(&shape));
        st.instrs.push(Instr {
            id,
            kind,
            operands,
            shape,
            called,
            name: None,
            scope,
            location: loc,
            sharding,
        });
        Op {
            idx,
            builder: self.uid,
        }
    }

    /// A copy of an instruction (for passes such as autodiff).
    #[allow(dead_code)]
    pub(crate) fn instr(&self, op: Op) -> Option<Instr> {
        if op.builder != self.uid {
            return None;
        }
        self.lock().instrs.get(op.index()).cloned()
    }

    /// Run `f` on the instruction list (creation order).
    #[allow(dead_code)]
    pub(crate) fn with_instrs<R>(&self, f: impl FnOnce(&[Instr]) -> R) -> R {
        f(&self.lock().instrs)
    }

    /// The handle of the instruction at `index` (creation order).
    #[allow(dead_code)]
    pub(crate) fn op_at(&self, index: usize) -> Op {
        Op {
            idx: index as u32,
            builder: self.uid,
        }
    }

    /// A built computation of this module by id.
    #[allow(dead_code)]
    pub(crate) fn computation_data(&self, id: i64) -> Option<Arc<CompData>> {
        self.module
            .comps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Declare the next parameter (numbered in call order) with a name for metadata and text.
    #[track_caller]
    pub fn parameter(&self, shape: Shape, name: &str) -> Result<Op> {
        let loc = Location::caller();
        let number = self.lock().params.len() as i64;
        let kind = Kind::Leaf(Leaf::Parameter(number));
        let op = self.push(loc, kind, Vec::new(), shape, Vec::new());
        let mut st = self.lock();
        st.instrs[op.index()].name = Some(sanitize(name).into_boxed_str());
        st.params.push(op.index());
        Ok(op)
    }

    /// The shape of an op of this builder.
    #[track_caller]
    pub fn shape(&self, op: Op) -> Result<Shape> {
        self.shape_of(Location::caller(), "shape", op)
    }

    /// `Some(d)` when `op` is an `iota` along dimension `d` (its values known while the graph is
    /// built, e.g. the static positions `0..T` a layer may turn into constant tables), else
    /// `None` (also for an op of another builder).
    pub fn iota_dimension(&self, op: Op) -> Option<usize> {
        if op.builder != self.uid {
            return None;
        }
        match self.lock().instrs.get(op.index())?.kind {
            Kind::Leaf(Leaf::Iota(d)) => Some(d as usize),
            _ => None,
        }
    }

    /// Annotate an op with a GSPMD sharding.
    #[track_caller]
    pub fn set_sharding(&self, op: Op, sharding: Sharding) -> Result<()> {
        let loc = Location::caller();
        let shape = self.shape_of(loc, "set_sharding", op)?;
        sharding
            .validate(&shape)
            .map_err(|e| self.shape_err(loc, e))?;
        self.lock().instrs[op.index()].sharding = Some(sharding);
        Ok(())
    }

    /// The sharding annotation of an op of this builder, if it has one.
    #[track_caller]
    pub fn sharding(&self, op: Op) -> Result<Option<Sharding>> {
        self.shape_of(Location::caller(), "sharding", op)?;
        Ok(self.lock().instrs[op.index()].sharding.clone())
    }

    /// Set an annotation already known to fit the op's shape.
    pub(crate) fn set_sharding_unchecked(&self, op: Op, sharding: Sharding) {
        self.lock().instrs[op.index()].sharding = Some(sharding);
    }

    /// The body of a manual region (between [`Builder::full_to_shard`] and
    /// [`Builder::shard_to_full`]): every instruction this builder makes while the guard lives
    /// is annotated `{manual}` (a tuple of them for tuple values), so the partitioner runs it
    /// as it is on each device's piece. Instructions of other computations (while bodies,
    /// reducers) are not annotated; the partitioner gives them their caller's sharding.
    /// Autodiff puts the backward pass of a `{manual}` instruction in such a scope too.
    pub fn manual_scope(&self) -> ShardingScope<'_> {
        self.lock().shardings.push(Sharding::Manual);
        ShardingScope { builder: self }
    }

    /// Whether a [`Builder::manual_scope`] is open (new instructions are annotated `{manual}`).
    pub(crate) fn in_manual_scope(&self) -> bool {
        !self.lock().shardings.is_empty()
    }

    /// Finish the computation with `root` as its result (a tuple op for several results).
    ///
    /// The builder keeps its instructions; building again makes another computation.
    #[track_caller]
    pub fn build(&self, root: Op) -> Result<crate::Computation> {
        let loc = Location::caller();
        self.shape_of(loc, "build", root)?;
        let id = self.module.next_id();
        let (instrs, params) = {
            let st = self.lock();
            (st.instrs.clone(), st.params.clone())
        };
        let data = Arc::new(CompData {
            id,
            name: format!("{}.{id}", self.name),
            instrs,
            root: root.index(),
            params,
            builder: self.uid,
        });
        self.module
            .comps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, data.clone());
        Ok(crate::Computation {
            data,
            module: self.module.clone(),
            module_name: self.name.clone(),
            aliases: Vec::new(),
        })
    }
}

/// A built computation: a sub-computation to pass to `reduce`/`while_loop`/`call`, or the entry
/// computation of a module to serialize.
#[derive(Debug, Clone)]
pub struct Computation {
    pub(crate) data: Arc<CompData>,
    pub(crate) module: Arc<ModuleShared>,
    module_name: String,
    /// (tuple output index, parameter number) pairs whose buffers may be shared (donation).
    aliases: Vec<(usize, usize)>,
}

impl Computation {
    /// The computation's unique name (`main.10`).
    pub fn name(&self) -> &str {
        &self.data.name
    }

    /// The computation's id in its module.
    pub fn id(&self) -> i64 {
        self.data.id
    }

    /// Parameter shapes and result shape.
    pub fn program_shape(&self) -> (Vec<Shape>, Shape) {
        (self.data.param_shapes(), self.data.result_shape().clone())
    }

    /// Number of instructions of this computation (not counting called computations).
    pub fn instruction_count(&self) -> usize {
        self.data.instrs.len()
    }

    /// Let output `output` (an element of the tuple result) reuse the buffer of parameter `param`
    /// when the caller donates it (XLA's `input_output_alias`, kind may-alias). The shapes must match.
    #[track_caller]
    pub fn with_input_output_alias(mut self, output: usize, param: usize) -> Result<Computation> {
        const OP: &str = "input_output_alias";
        let (params, result) = self.program_shape();
        let Some(out) = result.tuple_elements().and_then(|e| e.get(output)) else {
            return Err(Error::invalid(
                OP,
                format!(
                    "the result {} has no tuple element {output}",
                    result.short()
                ),
            ));
        };
        let Some(p) = params.get(param) else {
            return Err(Error::invalid(OP, format!("there is no parameter {param}")));
        };
        if out != p {
            return Err(Error::invalid(
                OP,
                format!(
                    "output {output} is {} but parameter {param} is {}",
                    out.short(),
                    p.short()
                ),
            ));
        }
        if self.aliases.iter().any(|&(o, q)| o == output || q == param) {
            return Err(Error::invalid(
                OP,
                format!("output {output} or parameter {param} is already aliased"),
            ));
        }
        self.aliases.push((output, param));
        Ok(self)
    }

    /// The module with this computation as entry and every computation it calls, callees first.
    pub fn to_proto(&self) -> proto::HloModuleProto {
        let comps = self.module.comps.lock().unwrap_or_else(|e| e.into_inner());
        // Post-order DFS over called computations (iterative, so deep nesting cannot overflow).
        let mut order: Vec<Arc<CompData>> = Vec::new();
        let mut seen: HashMap<i64, bool> = HashMap::new();
        let mut stack: Vec<(Arc<CompData>, bool)> = vec![(self.data.clone(), false)];
        while let Some((c, expanded)) = stack.pop() {
            if expanded {
                order.push(c);
                continue;
            }
            if seen.insert(c.id, true).is_some() {
                continue;
            }
            stack.push((c.clone(), true));
            let mut callees: Vec<i64> = c
                .instrs
                .iter()
                .flat_map(|i| i.called.iter().copied())
                .collect();
            callees.dedup();
            for id in callees.into_iter().rev() {
                if !seen.contains_key(&id) {
                    if let Some(cc) = comps.get(&id) {
                        stack.push((cc.clone(), false));
                    }
                }
            }
        }
        drop(comps);
        proto::HloModuleProto {
            name: self.module_name.clone(),
            entry_computation_name: self.data.name.clone(),
            entry_computation_id: self.data.id,
            computations: order.iter().map(|c| c.to_proto()).collect(),
            host_program_shape: Some(self.data.program_shape_proto()),
            id: self.data.id,
            input_output_alias: (!self.aliases.is_empty()).then(|| {
                proto::HloInputOutputAliasProto {
                    entries: self
                        .aliases
                        .iter()
                        .map(|&(o, p)| proto::AliasEntryProto {
                            output_shape_index: vec![o as i64],
                            parameter_number: p as i64,
                            parameter_shape_index: Vec::new(),
                            kind: 1,
                        })
                        .collect(),
                }
            }),
            ..Default::default()
        }
    }

    /// The serialized `HloModuleProto` (format `"hlo"` for PJRT compile).
    pub fn to_bytes(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&self.to_proto())
    }

    /// The module as XLA HLO text.
    pub fn to_text(&self) -> String {
        crate::text::print_module(&self.to_proto())
    }
}
