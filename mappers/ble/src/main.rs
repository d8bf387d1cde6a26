//! `edgetwin-mapper-ble`: the BLE mapper process: the SDK runtime with
//! [`BleDriver`](edgetwin_mapper_ble::BleDriver) on btleplug. Without a usable Bluetooth adapter
//! it keeps running: each device is `offline` with a one-line reason ("BLE: no Bluetooth adapter
//! available: ...") and is retried with backoff, so it comes up once BlueZ does.

fn main() -> std::process::ExitCode {
    edgetwin_mapper_sdk::main_with(edgetwin_mapper_ble::BleDriver::new())
}
