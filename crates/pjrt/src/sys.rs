//! Raw C layouts of the PJRT C API (0.114/0.115 header) and of XLA FFI (0.3/0.4), as measured in
//! `shared/reference/pjrt-ffi-facts.md`. Every struct has compile-time size and offset checks.
//!
//! Nothing here is public: the safe wrappers live in the other modules.

#![allow(dead_code)]

use std::ffi::c_void;

/// Opaque pointer type used for every PJRT handle (`PJRT_Client*`, `PJRT_Buffer*`, ...).
pub(crate) type Ptr = *mut c_void;

/// A PJRT API function: every one takes a pointer to its `*_Args` struct and returns a
/// `PJRT_Error*` (null on success). `PJRT_Error_Destroy` and `PJRT_Error_Message` return void,
/// which is ABI-compatible with ignoring the return register.
pub(crate) type PjrtFn = unsafe extern "C" fn(*mut c_void) -> Ptr;

/// Defines a `#[repr(C)]` struct, checks its size and every field offset at compile time, and gives
/// it `STRUCT_SIZE` (the C header's `*_STRUCT_SIZE`: the end of the last field) and a zeroed
/// constructor that fills `struct_size`.
macro_rules! c_struct {
    ($(#[$m:meta])* $name:ident [size $size:expr, struct_size $ss:expr]
     { $($field:ident : $ty:ty => $off:expr),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Debug, Clone, Copy)]
        pub(crate) struct $name { $(pub(crate) $field: $ty),* }
        const _: () = {
            assert!(std::mem::size_of::<$name>() == $size);
            $(assert!(std::mem::offset_of!($name, $field) == $off);)*
        };
        impl $name {
            /// The header's STRUCT_SIZE for this struct.
            pub(crate) const STRUCT_SIZE: usize = $ss;
            /// An all-zero value with `struct_size` filled in.
            #[allow(clippy::field_reassign_with_default)]
            pub(crate) fn new() -> Self {
                // SAFETY: every field is an integer, a bool, a raw pointer or a nested struct of
                // those, for which the all-zero bit pattern is a valid value.
                let mut s: Self = unsafe { std::mem::zeroed() };
                s.struct_size = $ss;
                s
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// PJRT_Api and extensions
// ---------------------------------------------------------------------------------------------

c_struct!(
    /// `PJRT_Api_Version`.
    ApiVersion [size 24, struct_size 24] {
        struct_size: usize => 0, extension_start: Ptr => 8, major_version: i32 => 16, minor_version: i32 => 20,
    }
);

c_struct!(
    /// The fixed header of `PJRT_Api`; the function table follows at byte 40.
    ApiHeader [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: *mut ExtensionBase => 8, pjrt_api_version: ApiVersion => 16,
    }
);

/// Byte offset of the function table in `PJRT_Api`.
pub(crate) const API_TABLE_OFFSET: usize = 40;

c_struct!(
    /// `PJRT_Extension_Base` (also `XLA_FFI_Extension_Base`, same layout).
    ExtensionBase [size 24, struct_size 24] {
        struct_size: usize => 0, ext_type: u32 => 8, next: *mut ExtensionBase => 16,
    }
);

/// `PJRT_Extension_Type_FFI`.
pub(crate) const EXTENSION_TYPE_FFI: u32 = 5;

c_struct!(
    /// `PJRT_FFI_Extension`.
    FfiExtension [size 48, struct_size 48] {
        struct_size: usize => 0, ext_type: u32 => 8, next: *mut ExtensionBase => 16,
        type_register: Ptr => 24, user_data_add: Ptr => 32, register_handler: Ptr => 40,
    }
);

c_struct!(
    /// `PJRT_FFI_Register_Handler_Args` (no `extension_start`; STRUCT_SIZE 52).
    FfiRegisterHandlerArgs [size 56, struct_size 52] {
        struct_size: usize => 0, target_name: *const u8 => 8, target_name_size: usize => 16,
        handler: Ptr => 24, platform_name: *const u8 => 32, platform_name_size: usize => 40, traits: u32 => 48,
    }
);

/// Function-table slots (index into the table at byte 40 of `PJRT_Api`).
pub(crate) mod slot {
    pub(crate) const ERROR_DESTROY: usize = 0;
    pub(crate) const ERROR_MESSAGE: usize = 1;
    pub(crate) const ERROR_GET_CODE: usize = 2;
    pub(crate) const PLUGIN_INITIALIZE: usize = 3;
    pub(crate) const PLUGIN_ATTRIBUTES: usize = 4;
    pub(crate) const EVENT_DESTROY: usize = 5;
    pub(crate) const EVENT_AWAIT: usize = 8;
    pub(crate) const CLIENT_CREATE: usize = 10;
    pub(crate) const CLIENT_DESTROY: usize = 11;
    pub(crate) const CLIENT_PLATFORM_NAME: usize = 12;
    pub(crate) const CLIENT_PROCESS_INDEX: usize = 13;
    pub(crate) const CLIENT_PLATFORM_VERSION: usize = 14;
    pub(crate) const CLIENT_DEVICES: usize = 15;
    pub(crate) const CLIENT_ADDRESSABLE_DEVICES: usize = 16;
    pub(crate) const CLIENT_COMPILE: usize = 20;
    pub(crate) const CLIENT_BUFFER_FROM_HOST: usize = 22;
    pub(crate) const DEVICE_DESCRIPTION_ID: usize = 23;
    pub(crate) const DEVICE_DESCRIPTION_PROCESS_INDEX: usize = 24;
    pub(crate) const DEVICE_DESCRIPTION_ATTRIBUTES: usize = 25;
    pub(crate) const DEVICE_DESCRIPTION_KIND: usize = 26;
    pub(crate) const DEVICE_DESCRIPTION_DEBUG_STRING: usize = 27;
    pub(crate) const DEVICE_GET_DESCRIPTION: usize = 29;
    pub(crate) const DEVICE_IS_ADDRESSABLE: usize = 30;
    pub(crate) const DEVICE_LOCAL_HARDWARE_ID: usize = 31;
    pub(crate) const EXECUTABLE_DESTROY: usize = 40;
    pub(crate) const EXECUTABLE_NAME: usize = 41;
    pub(crate) const EXECUTABLE_NUM_REPLICAS: usize = 42;
    pub(crate) const EXECUTABLE_NUM_PARTITIONS: usize = 43;
    pub(crate) const EXECUTABLE_NUM_OUTPUTS: usize = 44;
    pub(crate) const EXECUTABLE_GET_COST_ANALYSIS: usize = 46;
    pub(crate) const EXECUTABLE_OPTIMIZED_PROGRAM: usize = 48;
    pub(crate) const EXECUTABLE_SERIALIZE: usize = 49;
    pub(crate) const LOADED_EXECUTABLE_DESTROY: usize = 50;
    pub(crate) const LOADED_EXECUTABLE_GET_EXECUTABLE: usize = 51;
    pub(crate) const LOADED_EXECUTABLE_ADDRESSABLE_DEVICES: usize = 52;
    pub(crate) const LOADED_EXECUTABLE_EXECUTE: usize = 55;
    pub(crate) const EXECUTABLE_DESERIALIZE_AND_LOAD: usize = 56;
    pub(crate) const BUFFER_DESTROY: usize = 58;
    pub(crate) const BUFFER_ELEMENT_TYPE: usize = 59;
    pub(crate) const BUFFER_DIMENSIONS: usize = 60;
    pub(crate) const BUFFER_ON_DEVICE_SIZE: usize = 64;
    pub(crate) const BUFFER_DEVICE: usize = 65;
    pub(crate) const BUFFER_IS_DELETED: usize = 68;
    pub(crate) const BUFFER_COPY_TO_DEVICE: usize = 69;
    pub(crate) const BUFFER_TO_HOST: usize = 70;
    pub(crate) const BUFFER_UNSAFE_POINTER: usize = 73;
    pub(crate) const TOPOLOGY_CREATE: usize = 82;
    pub(crate) const TOPOLOGY_DESTROY: usize = 83;
    pub(crate) const TOPOLOGY_PLATFORM_NAME: usize = 84;
    pub(crate) const TOPOLOGY_PLATFORM_VERSION: usize = 85;
    pub(crate) const TOPOLOGY_GET_DEVICE_DESCRIPTIONS: usize = 86;
    pub(crate) const TOPOLOGY_SERIALIZE: usize = 87;
    pub(crate) const TOPOLOGY_ATTRIBUTES: usize = 88;
    pub(crate) const COMPILE: usize = 89;
    pub(crate) const EXECUTABLE_OUTPUT_ELEMENT_TYPES: usize = 90;
    pub(crate) const EXECUTABLE_OUTPUT_DIMENSIONS: usize = 91;
    pub(crate) const EXECUTABLE_FINGERPRINT: usize = 94;
    pub(crate) const EXECUTABLE_COMPILED_MEMORY_STATS: usize = 96;
    /// The highest slot that [`crate::Plugin::load`] requires to be present.
    pub(crate) const REQUIRED_MAX: usize = EXECUTABLE_COMPILED_MEMORY_STATS;
}

// ---------------------------------------------------------------------------------------------
// Errors, plugin, named values
// ---------------------------------------------------------------------------------------------

c_struct!(ErrorDestroyArgs [size 24, struct_size 24] { struct_size: usize => 0, extension_start: Ptr => 8, error: Ptr => 16 });
c_struct!(ErrorMessageArgs [size 40, struct_size 40] {
    struct_size: usize => 0, extension_start: Ptr => 8, error: Ptr => 16, message: *const u8 => 24, message_size: usize => 32,
});
c_struct!(ErrorGetCodeArgs [size 32, struct_size 28] {
    struct_size: usize => 0, extension_start: Ptr => 8, error: Ptr => 16, code: u32 => 24,
});
c_struct!(PluginInitializeArgs [size 16, struct_size 16] { struct_size: usize => 0, extension_start: Ptr => 8 });
c_struct!(PluginAttributesArgs [size 32, struct_size 32] {
    struct_size: usize => 0, extension_start: Ptr => 8, attributes: *const NamedValueRaw => 16, num_attributes: usize => 24,
});

c_struct!(
    /// `PJRT_NamedValue`; `value` is the 8-byte union (string pointer, int64, int64 array pointer,
    /// float in the low 4 bytes, bool in the low byte).
    NamedValueRaw [size 56, struct_size 56] {
        struct_size: usize => 0, extension_start: Ptr => 8, name: *const u8 => 16, name_size: usize => 24,
        value_type: u32 => 32, value: u64 => 40, value_size: usize => 48,
    }
);

/// `PJRT_NamedValue_Type` codes.
pub(crate) mod named_value_type {
    pub(crate) const STRING: u32 = 0;
    pub(crate) const INT64: u32 = 1;
    pub(crate) const INT64_LIST: u32 = 2;
    pub(crate) const FLOAT: u32 = 3;
    pub(crate) const BOOL: u32 = 4;
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

c_struct!(EventArgs [size 24, struct_size 24] { struct_size: usize => 0, extension_start: Ptr => 8, event: Ptr => 16 });

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

c_struct!(ClientCreateArgs [size 88, struct_size 88] {
    struct_size: usize => 0, extension_start: Ptr => 8, create_options: *const NamedValueRaw => 16, num_options: usize => 24,
    kv_get_callback: Ptr => 32, kv_get_user_arg: Ptr => 40, kv_put_callback: Ptr => 48, kv_put_user_arg: Ptr => 56,
    client: Ptr => 64, kv_try_get_callback: Ptr => 72, kv_try_get_user_arg: Ptr => 80,
});
c_struct!(
    /// `PJRT_KeyValueGetCallback_Args`: the plugin asks for `key`, waiting up to `timeout_in_ms`;
    /// the callback fills `value`, `value_size` and a deleter the plugin calls on `value`.
    /// `callback_error` points to the plugin's `PJRT_CallbackError` function pointer.
    KvGetCallbackArgs [size 80, struct_size 80] {
        struct_size: usize => 0, extension_start: Ptr => 8, key: *const u8 => 16, key_size: usize => 24,
        timeout_in_ms: i32 => 32, callback_error: Ptr => 40, user_arg: Ptr => 48, value: *mut u8 => 56,
        value_size: usize => 64, value_deleter_callback: Ptr => 72,
    }
);
c_struct!(
    /// `PJRT_KeyValueTryGetCallback_Args`: like the get args without the timeout; a missing key
    /// is a NOT_FOUND error.
    KvTryGetCallbackArgs [size 72, struct_size 72] {
        struct_size: usize => 0, extension_start: Ptr => 8, key: *const u8 => 16, key_size: usize => 24,
        callback_error: Ptr => 32, user_arg: Ptr => 40, value: *mut u8 => 48, value_size: usize => 56,
        value_deleter_callback: Ptr => 64,
    }
);
c_struct!(
    /// `PJRT_KeyValuePutCallback_Args`.
    KvPutCallbackArgs [size 64, struct_size 64] {
        struct_size: usize => 0, extension_start: Ptr => 8, key: *const u8 => 16, key_size: usize => 24,
        value: *const u8 => 32, value_size: usize => 40, callback_error: Ptr => 48, user_arg: Ptr => 56,
    }
);
/// `PJRT_CallbackError`: the plugin's function that makes a `PJRT_Error*` from a code and a
/// message (copied) for a callback to return.
pub(crate) type CallbackErrorFn =
    unsafe extern "C" fn(code: u32, message: *const u8, size: usize) -> Ptr;
c_struct!(ClientDestroyArgs [size 24, struct_size 24] { struct_size: usize => 0, extension_start: Ptr => 8, client: Ptr => 16 });
c_struct!(
    /// `PJRT_Client_PlatformName_Args` / `PJRT_Client_PlatformVersion_Args` (same layout).
    ClientStringArgs [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: Ptr => 8, client: Ptr => 16, value: *const u8 => 24, value_size: usize => 32,
    }
);
c_struct!(ClientProcessIndexArgs [size 32, struct_size 28] {
    struct_size: usize => 0, extension_start: Ptr => 8, client: Ptr => 16, process_index: i32 => 24,
});
c_struct!(
    /// `PJRT_Client_Devices_Args` / `PJRT_Client_AddressableDevices_Args` /
    /// `PJRT_LoadedExecutable_AddressableDevices_Args` (same layout).
    DeviceListArgs [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: Ptr => 8, owner: Ptr => 16, devices: *const Ptr => 24, num_devices: usize => 32,
    }
);

// ---------------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------------

c_struct!(DeviceGetDescriptionArgs [size 32, struct_size 32] {
    struct_size: usize => 0, extension_start: Ptr => 8, device: Ptr => 16, description: Ptr => 24,
});
c_struct!(DeviceIsAddressableArgs [size 32, struct_size 25] {
    struct_size: usize => 0, extension_start: Ptr => 8, device: Ptr => 16, is_addressable: bool => 24,
});
c_struct!(
    /// `PJRT_Device_LocalHardwareId_Args`, `PJRT_DeviceDescription_Id_Args`,
    /// `PJRT_DeviceDescription_ProcessIndex_Args` (same layout).
    HandleIntArgs [size 32, struct_size 28] {
        struct_size: usize => 0, extension_start: Ptr => 8, handle: Ptr => 16, value: i32 => 24,
    }
);
c_struct!(
    /// `PJRT_DeviceDescription_Kind_Args` / `..._DebugString_Args`, `PJRT_Executable_Name_Args`,
    /// `PJRT_Executable_Fingerprint_Args` (same layout).
    HandleStringArgs [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: Ptr => 8, handle: Ptr => 16, value: *const u8 => 24, value_size: usize => 32,
    }
);

// ---------------------------------------------------------------------------------------------
// Compile and executables
// ---------------------------------------------------------------------------------------------

c_struct!(Program [size 48, struct_size 48] {
    struct_size: usize => 0, extension_start: Ptr => 8, code: *mut u8 => 16, code_size: usize => 24,
    format: *const u8 => 32, format_size: usize => 40,
});
c_struct!(ClientCompileArgs [size 56, struct_size 56] {
    struct_size: usize => 0, extension_start: Ptr => 8, client: Ptr => 16, program: *const Program => 24,
    compile_options: *const u8 => 32, compile_options_size: usize => 40, executable: Ptr => 48,
});
c_struct!(
    /// Args of the `PJRT_Executable_*` functions that take one handle and return one `size_t`
    /// (NumOutputs, NumReplicas, NumPartitions) and of `PJRT_LoadedExecutable_GetExecutable`.
    HandleWordArgs [size 32, struct_size 32] {
        struct_size: usize => 0, extension_start: Ptr => 8, handle: Ptr => 16, value: usize => 24,
    }
);
c_struct!(
    /// `PJRT_*_Destroy_Args` for executables, buffers, clients (one handle).
    HandleArgs [size 24, struct_size 24] { struct_size: usize => 0, extension_start: Ptr => 8, handle: Ptr => 16 }
);

/// Args structs of the one-handle PJRT functions (destroy, and queries returning an int, a word
/// or a string): each is built from the handle alone, so one call path serves them all
/// (`Plugin::query`).
pub(crate) trait HandleQuery {
    /// A zeroed args struct for `handle`.
    fn for_handle(handle: Ptr) -> Self;
}

macro_rules! handle_query {
    ($($t:ident),*) => {$(
        impl HandleQuery for $t {
            fn for_handle(handle: Ptr) -> Self {
                let mut a = Self::new();
                a.handle = handle;
                a
            }
        }
    )*};
}
handle_query!(HandleArgs, HandleIntArgs, HandleStringArgs, HandleWordArgs);
c_struct!(ExecutableOptimizedProgramArgs [size 32, struct_size 32] {
    struct_size: usize => 0, extension_start: Ptr => 8, executable: Ptr => 16, program: *mut Program => 24,
});
c_struct!(ExecutableSerializeArgs [size 56, struct_size 56] {
    struct_size: usize => 0, extension_start: Ptr => 8, executable: Ptr => 16, serialized_bytes: *const u8 => 24,
    serialized_bytes_size: usize => 32, serialized_executable: Ptr => 40, serialized_executable_deleter: Ptr => 48,
});
c_struct!(ExecutableDeserializeArgs [size 72, struct_size 72] {
    struct_size: usize => 0, extension_start: Ptr => 8, client: Ptr => 16, serialized_executable: *const u8 => 24,
    serialized_executable_size: usize => 32, loaded_executable: Ptr => 40,
    overridden_serialized_compile_options: *const u8 => 48, overridden_serialized_compile_options_size: usize => 56,
    load_options: Ptr => 64,
});
c_struct!(ExecutableMemoryStatsArgs [size 144, struct_size 144] {
    struct_size: usize => 0, extension_start: Ptr => 8, executable: Ptr => 16,
    generated_code_size_in_bytes: i64 => 24, argument_size_in_bytes: i64 => 32, output_size_in_bytes: i64 => 40,
    alias_size_in_bytes: i64 => 48, temp_size_in_bytes: i64 => 56, host_generated_code_size_in_bytes: i64 => 64,
    host_argument_size_in_bytes: i64 => 72, host_output_size_in_bytes: i64 => 80, host_alias_size_in_bytes: i64 => 88,
    host_temp_size_in_bytes: i64 => 96, peak_memory_in_bytes: i64 => 104, total_size_in_bytes: i64 => 112,
    total_allocation_bytes: i64 => 120, indefinite_allocations: i64 => 128, peak_unpadded_heap_bytes: i64 => 136,
});
c_struct!(ExecutableOutputTypesArgs [size 40, struct_size 40] {
    struct_size: usize => 0, extension_start: Ptr => 8, executable: Ptr => 16, output_types: *const u32 => 24,
    num_output_types: usize => 32,
});
c_struct!(ExecutableOutputDimsArgs [size 48, struct_size 48] {
    struct_size: usize => 0, extension_start: Ptr => 8, executable: Ptr => 16, num_outputs: usize => 24,
    dims: *const i64 => 32, dim_sizes: *const usize => 40,
});
c_struct!(ExecuteOptions [size 144, struct_size 144] {
    struct_size: usize => 0, extension_start: Ptr => 8, send_callbacks: Ptr => 16, recv_callbacks: Ptr => 24,
    num_send_ops: usize => 32, num_recv_ops: usize => 40, launch_id: i32 => 48,
    non_donatable_input_indices: *const i64 => 56, num_non_donatable_input_indices: usize => 64,
    context: Ptr => 72, call_location: Ptr => 80, num_tasks: usize => 88, task_ids: Ptr => 96,
    incarnation_ids: Ptr => 104, multi_slice_config: Ptr => 112,
    use_major_to_minor_data_layout_for_callbacks: bool => 120, hlo_output_callbacks: Ptr => 128,
    num_hlo_output_callbacks: usize => 136,
});
c_struct!(ExecuteArgs [size 80, struct_size 80] {
    struct_size: usize => 0, extension_start: Ptr => 8, executable: Ptr => 16, options: *const ExecuteOptions => 24,
    argument_lists: *const *const Ptr => 32, num_devices: usize => 40, num_args: usize => 48,
    output_lists: *const *mut Ptr => 56, device_complete_events: *mut Ptr => 64, execute_device: Ptr => 72,
});

// ---------------------------------------------------------------------------------------------
// Topologies and client-less compilation (ahead of time)
// ---------------------------------------------------------------------------------------------

c_struct!(TopologyCreateArgs [size 56, struct_size 56] {
    struct_size: usize => 0, extension_start: Ptr => 8, topology_name: *const u8 => 16, topology_name_size: usize => 24,
    create_options: *const NamedValueRaw => 32, num_options: usize => 40, topology: Ptr => 48,
});
c_struct!(
    /// `PJRT_TopologyDescription_GetDeviceDescriptions_Args`.
    TopologyDeviceDescriptionsArgs [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: Ptr => 8, topology: Ptr => 16, descriptions: *const Ptr => 24,
        num_descriptions: usize => 32,
    }
);
c_struct!(TopologySerializeArgs [size 56, struct_size 56] {
    struct_size: usize => 0, extension_start: Ptr => 8, topology: Ptr => 16, serialized_bytes: *const u8 => 24,
    serialized_bytes_size: usize => 32, serialized_topology: Ptr => 40, serialized_topology_deleter: Ptr => 48,
});
c_struct!(
    /// `PJRT_TopologyDescription_Attributes_Args` (pointer before count).
    TopologyAttributesArgs [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: Ptr => 8, topology: Ptr => 16, attributes: *const NamedValueRaw => 24,
        num_attributes: usize => 32,
    }
);
c_struct!(
    /// `PJRT_DeviceDescription_Attributes_Args` (count before pointer).
    DeviceDescriptionAttributesArgs [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: Ptr => 8, device_description: Ptr => 16, num_attributes: usize => 24,
        attributes: *const NamedValueRaw => 32,
    }
);
c_struct!(
    /// `PJRT_Compile_Args`: compile for a topology, optionally without a client.
    CompileArgs [size 64, struct_size 64] {
        struct_size: usize => 0, extension_start: Ptr => 8, topology: Ptr => 16, program: *const Program => 24,
        compile_options: *const u8 => 32, compile_options_size: usize => 40, client: Ptr => 48, executable: Ptr => 56,
    }
);
c_struct!(
    /// `PJRT_Executable_GetCostAnalysis_Args` (count before pointer).
    CostAnalysisArgs [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: Ptr => 8, executable: Ptr => 16, num_properties: usize => 24,
        properties: *const NamedValueRaw => 32,
    }
);

// ---------------------------------------------------------------------------------------------
// Buffers
// ---------------------------------------------------------------------------------------------

c_struct!(BufferFromHostArgs [size 120, struct_size 120] {
    struct_size: usize => 0, extension_start: Ptr => 8, client: Ptr => 16, data: *const c_void => 24,
    element_type: u32 => 32, dims: *const i64 => 40, num_dims: usize => 48, byte_strides: *const i64 => 56,
    num_byte_strides: usize => 64, host_buffer_semantics: u32 => 72, device: Ptr => 80, memory: Ptr => 88,
    device_layout: Ptr => 96, done_with_host_buffer: Ptr => 104, buffer: Ptr => 112,
});
c_struct!(BufferToHostArgs [size 56, struct_size 56] {
    struct_size: usize => 0, extension_start: Ptr => 8, src: Ptr => 16, host_layout: Ptr => 24, dst: *mut c_void => 32,
    dst_size: usize => 40, event: Ptr => 48,
});
c_struct!(BufferDimensionsArgs [size 40, struct_size 40] {
    struct_size: usize => 0, extension_start: Ptr => 8, buffer: Ptr => 16, dims: *const i64 => 24, num_dims: usize => 32,
});
c_struct!(BufferElementTypeArgs [size 32, struct_size 28] {
    struct_size: usize => 0, extension_start: Ptr => 8, buffer: Ptr => 16, element_type: u32 => 24,
});
c_struct!(BufferIsDeletedArgs [size 32, struct_size 25] {
    struct_size: usize => 0, extension_start: Ptr => 8, buffer: Ptr => 16, is_deleted: bool => 24,
});
c_struct!(BufferCopyToDeviceArgs [size 40, struct_size 40] {
    struct_size: usize => 0, extension_start: Ptr => 8, buffer: Ptr => 16, dst_device: Ptr => 24, dst_buffer: Ptr => 32,
});

// ---------------------------------------------------------------------------------------------
// XLA FFI (handler side)
// ---------------------------------------------------------------------------------------------

c_struct!(
    /// `XLA_FFI_Api_Version`.
    FfiApiVersion [size 24, struct_size 24] {
        struct_size: usize => 0, extension_start: Ptr => 8, major_version: i32 => 16, minor_version: i32 => 20,
    }
);
c_struct!(
    /// The header of `XLA_FFI_Api` up to `XLA_FFI_Error_Create`.
    XlaFfiApi [size 56, struct_size 56] {
        struct_size: usize => 0, extension_start: Ptr => 8, api_version: FfiApiVersion => 16, internal_api: Ptr => 40,
        error_create: Ptr => 48,
    }
);
c_struct!(FfiErrorCreateArgs [size 32, struct_size 28] {
    struct_size: usize => 0, extension_start: Ptr => 8, message: *const std::ffi::c_char => 16, errc: u32 => 24,
});
c_struct!(
    /// `XLA_FFI_Args` / `XLA_FFI_Rets` (same layout).
    FfiArgs [size 40, struct_size 40] {
        struct_size: usize => 0, extension_start: Ptr => 8, size: i64 => 16, types: *const u32 => 24, args: *const Ptr => 32,
    }
);
c_struct!(FfiAttrs [size 48, struct_size 48] {
    struct_size: usize => 0, extension_start: Ptr => 8, size: i64 => 16, types: *const u32 => 24,
    names: *const *const FfiByteSpan => 32, attrs: *const Ptr => 40,
});
c_struct!(FfiCallFrame [size 176, struct_size 168] {
    struct_size: usize => 0, extension_start: *mut ExtensionBase => 8, api: *const XlaFfiApi => 16, ctx: Ptr => 24,
    stage: u32 => 32, args: FfiArgs => 40, rets: FfiArgs => 80, attrs: FfiAttrs => 120, future: Ptr => 168,
});
c_struct!(FfiBuffer [size 48, struct_size 48] {
    struct_size: usize => 0, extension_start: Ptr => 8, dtype: u32 => 16, data: *mut c_void => 24, rank: i64 => 32,
    dims: *const i64 => 40,
});
c_struct!(
    /// `XLA_FFI_Metadata`; `state_type_id` exists only when `struct_size >= 48`.
    FfiMetadata [size 48, struct_size 36] {
        struct_size: usize => 0, api_version: FfiApiVersion => 8, traits: u32 => 32, state_type_id: i64 => 40,
    }
);
c_struct!(FfiMetadataExtension [size 32, struct_size 32] {
    struct_size: usize => 0, ext_type: u32 => 8, next: *mut ExtensionBase => 16, metadata: *mut FfiMetadata => 24,
});

/// `XLA_FFI_ByteSpan` (no struct_size).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FfiByteSpan {
    pub(crate) ptr: *const u8,
    pub(crate) len: usize,
}
/// `XLA_FFI_Scalar` (no struct_size).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FfiScalar {
    pub(crate) dtype: u32,
    pub(crate) value: *const c_void,
}
/// `XLA_FFI_Array` (no struct_size).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct FfiArray {
    pub(crate) dtype: u32,
    pub(crate) size: usize,
    pub(crate) data: *const c_void,
}
const _: () = {
    assert!(std::mem::size_of::<FfiByteSpan>() == 16);
    assert!(std::mem::offset_of!(FfiByteSpan, len) == 8);
    assert!(std::mem::size_of::<FfiScalar>() == 16);
    assert!(std::mem::offset_of!(FfiScalar, value) == 8);
    assert!(std::mem::size_of::<FfiArray>() == 24);
    assert!(std::mem::offset_of!(FfiArray, size) == 8);
    assert!(std::mem::offset_of!(FfiArray, data) == 16);
};

/// `XLA_FFI_Extension_Metadata`.
pub(crate) const FFI_EXTENSION_METADATA: u32 = 1;
/// `XLA_FFI_ExecutionStage_EXECUTE`.
pub(crate) const FFI_STAGE_EXECUTE: u32 = 3;
/// `XLA_FFI_ArgType_BUFFER` / `XLA_FFI_RetType_BUFFER`.
pub(crate) const FFI_BUFFER: u32 = 1;
/// `XLA_FFI_AttrType_*`.
pub(crate) mod ffi_attr {
    pub(crate) const ARRAY: u32 = 1;
    pub(crate) const DICTIONARY: u32 = 2;
    pub(crate) const SCALAR: u32 = 3;
    pub(crate) const STRING: u32 = 4;
}
