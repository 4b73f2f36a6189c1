//! One inspect path for `rattn dump` and `rattn compile`. A traced program ([`Module`]) is
//! compiled for one device, on a loaded client (`dump`, the host's plugin with our CPU kernels)
//! or for a topology without devices (`compile`, libtpu or the CUDA plugin) through one
//! [`Compiler`], and described the same way for both: its memory ([`MemoryReport`], whose peak is
//! pjrt's), the program XLA optimized, and the files of a dump ([`Dump`], named like XLA's
//! `--xla_dump_to` by [`names`]). Bytes and counts are printed with [`units`].
//!
//! What only one command needs stays with it: `compile` adds the fit verdict and the TPU cost
//! analysis of the [`Compiled::unloaded`] executable; `dump` adds the model's costs.

pub mod memory;
pub mod names;
pub mod units;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use hlo_builder::Computation;
use pjrt::topology::Topology;
use pjrt::{Client, CompileOptions, Executable, LoadedExecutable, Program};

pub use memory::MemoryReport;
pub use names::{Format, Stage};

/// A traced program, ready to compile and dump.
pub struct Module {
    /// Position in the dump: `module_0000`, `module_0001`, …
    pub index: usize,
    /// `train_step` or `decode_step`.
    pub name: String,
    /// The program as we built it.
    pub comp: Computation,
    /// Tracing with the HLO builder, seconds.
    pub trace_seconds: f64,
}

impl Module {
    /// Traces module number `index` called `name` with `build`, timing it.
    pub fn trace(
        index: usize,
        name: &str,
        build: impl FnOnce() -> Result<Computation>,
    ) -> Result<Module> {
        let t0 = Instant::now();
        let comp = build()?;
        Ok(Module {
            index,
            name: name.to_string(),
            comp,
            trace_seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Instructions of the entry computation as we built it.
    pub fn instructions(&self) -> usize {
        self.comp.instruction_count()
    }

    /// Compiles the module for one device with `compiler`, timing it. The compiler's error is
    /// kept as pjrt's, so that a caller can tell a refusal for memory
    /// ([`pjrt::ErrorCode::ResourceExhausted`]) from a failure.
    pub fn compile(&self, compiler: Compiler<'_>) -> Compilation {
        self.compile_with(compiler, &CompileOptions::default())
    }

    /// [`Module::compile`] with explicit compile options (an SPMD program over a mesh).
    pub fn compile_with(&self, compiler: Compiler<'_>, options: &CompileOptions) -> Compilation {
        let bytes = self.comp.to_bytes();
        let t0 = Instant::now();
        let result = compiler.compile(&bytes, options);
        Compilation {
            hlo_bytes: bytes.len(),
            seconds: t0.elapsed().as_secs_f64(),
            result,
        }
    }
}

/// Where a module is compiled.
#[derive(Clone, Copy, Debug)]
pub enum Compiler<'a> {
    /// A client on a loaded plugin (`rattn dump`); the executable could run.
    Client(&'a Client),
    /// A topology of devices that need not be attached (`rattn compile`); the executable is
    /// only inspected.
    Topology(&'a Topology),
}

impl Compiler<'_> {
    fn compile(self, hlo: &[u8], options: &CompileOptions) -> pjrt::Result<Compiled> {
        match self {
            Compiler::Client(c) => c.compile(Program::Hlo(hlo), options).map(Compiled::Loaded),
            Compiler::Topology(t) => t
                .compile(Program::Hlo(hlo), options)
                .map(Compiled::Unloaded),
        }
    }
}

/// One compile of a [`Module`].
pub struct Compilation {
    /// Size of the serialized `HloModuleProto` sent to the compiler.
    pub hlo_bytes: usize,
    /// The compile, seconds (also when it failed).
    pub seconds: f64,
    /// The compiled program, or the compiler's error.
    pub result: pjrt::Result<Compiled>,
}

/// A compiled program, from either kind of [`Compiler`].
pub enum Compiled {
    /// Compiled by a client.
    Loaded(LoadedExecutable),
    /// Compiled for a topology.
    Unloaded(Executable),
}

impl Compiled {
    /// Memory per device.
    pub fn memory(&self) -> pjrt::Result<MemoryReport> {
        let stats = match self {
            Compiled::Loaded(e) => e.memory_stats()?,
            Compiled::Unloaded(e) => e.memory_stats()?,
        };
        Ok(MemoryReport::from(&stats))
    }

    /// The optimized program, a serialized `HloModuleProto`.
    pub fn optimized_program(&self) -> pjrt::Result<Vec<u8>> {
        match self {
            Compiled::Loaded(e) => e.optimized_program(),
            Compiled::Unloaded(e) => e.optimized_program(),
        }
    }

    /// The executable compiled for a topology (fit check, cost analysis), if it is one.
    pub fn unloaded(&self) -> Option<&Executable> {
        match self {
            Compiled::Unloaded(e) => Some(e),
            Compiled::Loaded(_) => None,
        }
    }
}

/// Where a dump is written and in which formats.
#[derive(Clone, Copy, Debug)]
pub struct Dump<'a> {
    /// The directory (it must exist).
    pub dir: &'a Path,
    /// The formats written for each module and stage, in this order.
    pub formats: &'a [Format],
}

impl Dump<'_> {
    /// Writes `module` as we built it; returns the paths written.
    pub fn before(&self, module: &Module) -> Result<Vec<PathBuf>> {
        self.write(module, Stage::Before, &|format| {
            Ok(match format {
                Format::Text => module.comp.to_text().into_bytes(),
                Format::Proto => module.comp.to_bytes(),
            })
        })
    }

    /// Writes the program the plugin optimized `module` into for `platform` (`cpu`, `tpu`,
    /// `gpu`); returns the paths written.
    pub fn after(
        &self,
        module: &Module,
        platform: &str,
        compiled: &Compiled,
    ) -> Result<Vec<PathBuf>> {
        let name = &module.name;
        let proto = compiled
            .optimized_program()
            .with_context(|| format!("optimized program of {name}"))?;
        self.write(module, Stage::After { platform }, &|format| {
            Ok(match format {
                Format::Text => hlo_builder::print_module_bytes(&proto)
                    .with_context(|| format!("printing the optimized {name}"))?
                    .into_bytes(),
                Format::Proto => proto.clone(),
            })
        })
    }

    fn write(
        &self,
        module: &Module,
        stage: Stage<'_>,
        contents: &dyn Fn(Format) -> Result<Vec<u8>>,
    ) -> Result<Vec<PathBuf>> {
        self.formats
            .iter()
            .map(|&format| {
                let path =
                    self.dir
                        .join(names::file_name(module.index, &module.name, stage, format));
                std::fs::write(&path, contents(format)?)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                Ok(path)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hlo_builder::{Builder, ElementType, Shape};

    fn module() -> Module {
        Module::trace(3, "double", || {
            let b = Builder::new("double");
            let x = b.parameter(Shape::array(ElementType::F32, &[2]), "x")?;
            Ok(b.build(b.add(x, x)?)?)
        })
        .unwrap()
    }

    #[test]
    fn a_dump_writes_each_format_under_xla_names() {
        let dir = tempfile::tempdir().unwrap();
        let m = module();
        assert_eq!((m.index, m.name.as_str()), (3, "double"));
        let both = Dump {
            dir: dir.path(),
            formats: &[Format::Text, Format::Proto],
        };
        let files = both.before(&m).unwrap();
        let names: Vec<_> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "module_0003.double.before_optimizations.txt",
                "module_0003.double.before_optimizations.hlo.pb"
            ]
        );
        let text = std::fs::read_to_string(&files[0]).unwrap();
        assert_eq!(text, m.comp.to_text());
        assert_eq!(std::fs::read(&files[1]).unwrap(), m.comp.to_bytes());
        let none = Dump {
            dir: dir.path(),
            formats: &[],
        };
        assert!(none.before(&m).unwrap().is_empty());
    }
}
