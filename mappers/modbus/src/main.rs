//! `edgetwin-mapper-modbus`: the Modbus TCP/RTU mapper process (SDK runtime + `ModbusDriver`).

fn main() {}
