//! What a device is, as its plugin describes it (`PJRT_DeviceDescription`): read once, the same
//! way for the devices of a [`crate::Client`] and those of a [`crate::Topology`].

use crate::error::Result;
use crate::plugin::{read_named_values, NamedValue, Plugin};
use crate::sys::{self, slot, Ptr};

/// One device's description, read once when its client or topology lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDescription {
    /// Global device id.
    pub id: i32,
    /// Index of the process (host) that owns the device.
    pub process_index: i32,
    /// Device kind, e.g. `"cpu"`, `"TPU v5 lite"`, `"NVIDIA H100 80GB HBM3"`.
    pub kind: String,
    /// The plugin's debug string, e.g. `"cpu:0"`, `"TPU_0(process=0,(0,0,0,0))"`.
    pub debug_string: String,
    /// Platform-specific attributes: TPU `coords`, `core_on_chip`, `num_cores`,
    /// `device_memory_bytes_limit`; GPU `compute_capability`, `core_count`,
    /// `device_memory_bytes_limit`, ...
    pub attributes: Vec<(String, NamedValue)>,
}

impl DeviceDescription {
    /// The attribute `name`, if present.
    pub fn attribute(&self, name: &str) -> Option<&NamedValue> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    fn int_attribute(&self, name: &str) -> Option<i64> {
        match self.attribute(name)? {
            NamedValue::I64(v) => Some(*v),
            _ => None,
        }
    }

    /// Device memory (HBM) in bytes (`device_memory_bytes_limit`).
    pub fn memory_bytes_limit(&self) -> Option<i64> {
        self.int_attribute("device_memory_bytes_limit")
    }

    /// TensorCores per device on TPU (`num_cores`: 2 for megacore), SMs on GPU (`core_count`).
    pub fn num_cores(&self) -> Option<i64> {
        self.int_attribute("num_cores")
            .or_else(|| self.int_attribute("core_count"))
    }

    /// Reads the description `desc`.
    ///
    /// # Safety
    /// `desc` must be a live `PJRT_DeviceDescription` of `plugin` (owned by a client or a
    /// topology that outlives the call).
    pub(crate) unsafe fn read(plugin: &Plugin, desc: Ptr) -> Result<DeviceDescription> {
        let mut attrs = sys::DeviceDescriptionAttributesArgs::new();
        attrs.device_description = desc;
        // SAFETY: slot 25 takes PJRT_DeviceDescription_Attributes_Args; `desc` is live.
        unsafe {
            plugin.call(
                slot::DEVICE_DESCRIPTION_ATTRIBUTES,
                "PJRT_DeviceDescription_Attributes",
                &mut attrs,
            )
        }?;
        let int = |s: usize, name: &'static str| -> Result<i32> {
            // SAFETY: the slot takes (description, int out) args and `desc` is live.
            unsafe { plugin.query_i32(s, name, desc) }
        };
        let string = |s: usize, name: &'static str| -> Result<String> {
            // SAFETY: the slot takes (description, string out) args and `desc` is live.
            unsafe { plugin.query_string(s, name, desc) }
        };
        Ok(DeviceDescription {
            id: int(slot::DEVICE_DESCRIPTION_ID, "PJRT_DeviceDescription_Id")?,
            process_index: int(
                slot::DEVICE_DESCRIPTION_PROCESS_INDEX,
                "PJRT_DeviceDescription_ProcessIndex",
            )?,
            kind: string(slot::DEVICE_DESCRIPTION_KIND, "PJRT_DeviceDescription_Kind")?,
            debug_string: string(
                slot::DEVICE_DESCRIPTION_DEBUG_STRING,
                "PJRT_DeviceDescription_DebugString",
            )?,
            // SAFETY: `num_attributes` named values owned by the description.
            attributes: unsafe { read_named_values(attrs.attributes, attrs.num_attributes) },
        })
    }
}
