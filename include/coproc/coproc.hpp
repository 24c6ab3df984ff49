// coproc/coproc.hpp - everything coproc offers, in one include.
#pragma once

#include <coproc/async_generator.hpp>
#include <coproc/cancellation.hpp>
#include <coproc/error.hpp>
#include <coproc/event_loop.hpp>
#include <coproc/future.hpp>
#include <coproc/process_pool.hpp>
#include <coproc/progress.hpp>
#include <coproc/shared_buffer.hpp>
#include <coproc/sink.hpp>
#include <coproc/stream.hpp>
#include <coproc/task.hpp>
#include <coproc/wait.hpp>
#include <coproc/when_all.hpp>
#include <coproc/when_any.hpp>
#include <coproc/with_timeout.hpp>
#include <coproc/worker.hpp>
