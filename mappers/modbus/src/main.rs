//! `edgetwin-mapper-modbus`: the Modbus TCP/RTU mapper process: the SDK runtime with
//! [`ModbusDriver`]. `EDGETWIN_MODBUS_COALESCE=0` turns read coalescing off (one request per
//! property), for comparisons.

use std::process::ExitCode;

use edgetwin_mapper_modbus::codec::PlanLimits;
use edgetwin_mapper_modbus::ModbusDriver;

fn main() -> ExitCode {
    let driver = match std::env::var("EDGETWIN_MODBUS_COALESCE").as_deref() {
        Ok("0" | "false" | "off") => ModbusDriver::with_limits(PlanLimits::single()),
        _ => ModbusDriver::new(),
    };
    edgetwin_mapper_sdk::main_with(driver)
}
