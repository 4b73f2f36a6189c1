//! XLA's data model, shared by the graph builder (`hlo-builder`) and the runtime (`pjrt`):
//!
//! * [`ElementType`] and [`NativeType`]: element types with their `PrimitiveType` numbers,
//!   names and sizes (module [`dtype`], the workspace's one dtype table);
//! * [`Shape`]: array and tuple shapes with their `ShapeProto` form;
//! * [`proto`]: `prost` messages for the parts of `hlo.proto` / `xla_data.proto` in use;
//! * [`compile_options`]: `prost` messages for `xla.CompileOptionsProto`.
//!
//! This crate has no runtime and no graph logic, so both sides can depend on it.
//!
//! ```
//! use xla_data::{ElementType, NativeType, Shape};
//!
//! let s = Shape::array(f32::TYPE, &[2, 3]);
//! assert_eq!(s.to_string(), "f32[2,3]{1,0}");
//! assert_eq!(s.byte_size(), 24);
//! let p = s.to_proto();
//! assert_eq!(p.element_type, ElementType::F32.primitive_type());
//! assert_eq!(Shape::from_proto(&p), Some(s));
//! assert_eq!(xla_data::proto::primitive_type_name(16), "bf16");
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod compile_options;
pub mod dtype;
pub mod proto;
mod shape;

pub use dtype::{ElementType, NativeType};
pub use shape::Shape;
