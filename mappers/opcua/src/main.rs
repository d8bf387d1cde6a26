//! `edgetwin-mapper-opcua`: the OPC UA mapper process: the SDK runtime with [`OpcuaDriver`].
//! `EDGETWIN_OPCUA_PKI_DIR` sets the client's PKI folder (default: a folder in the temp dir);
//! `EDGETWIN_OPCUA_TRUST_SERVER_CERTS=0` accepts only server certificates already in its
//! `trusted/` folder (default: trust a server certificate on first use).

use std::process::ExitCode;

use edgetwin_mapper_opcua::{ClientOptions, OpcuaDriver};

fn main() -> ExitCode {
    let mut options = ClientOptions::default();
    if let Ok(dir) = std::env::var("EDGETWIN_OPCUA_PKI_DIR") {
        options.pki_dir = dir.into();
    }
    if let Ok("0" | "false" | "off") = std::env::var("EDGETWIN_OPCUA_TRUST_SERVER_CERTS").as_deref()
    {
        options.trust_server_certs = false;
    }
    edgetwin_mapper_sdk::main_with(OpcuaDriver::new(options))
}
