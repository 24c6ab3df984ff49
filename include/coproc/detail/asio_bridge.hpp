// coproc/detail/asio_bridge.hpp - the implementation of coproc/asio.hpp:
// the driver's bookkeeping, the operations and their registry, the
// initiations. Not API. Included by coproc/asio.hpp after its declarations
// (it uses them), inside namespace coproc; never include it on its own.
#pragma once

namespace detail::asio_bridge {

// Translates coproc's cancellation into Asio's: every cancelled_error
// becomes std::system_error(asio::error::operation_aborted) with the same
// message; every other exception is passed on as it is.
inline std::exception_ptr asio_error_of(std::exception_ptr error) {
    if (!error) return error;
    try {
        std::rethrow_exception(error);
    } catch (const cancelled_error& cancelled) {
        return std::make_exception_ptr(std::system_error(asio::error::operation_aborted, cancelled.what()));
    } catch (...) {
        return error;
    }
}

template <class Executor>
asio::execution_context& context_of(const Executor& executor) {
    if constexpr (asio::can_query<const Executor&, asio::execution::context_t>::value) {
        return asio::query(executor, asio::execution::context);
    } else {
        return executor.context();
    }
}

// --- the driver's bookkeeping
//
// What Asio code wants from one loop is a loop_demand: how many operations
// on the loop's pools are outstanding, plus the holds, and the driver that
// drives the loop, if any. Operations find it through demand_table by the
// loop's address, whether a driver exists or not (it may come later), and
// count themselves in it (driver_ticket) until their handler is posted.

class driver_core;

class loop_demand {
public:
    // Any thread. The first demand wakes the driver.
    void acquire() noexcept;
    // Any thread. The last release lets the driver go idle, so that
    // io_context::run() can return.
    void release() noexcept;
    // After this thread posted to the loop (a submit, a cancel): steps the
    // loop soon, whether or not its wake-up descriptor turns readable.
    // A post() to the loop wakes wait_fd() on its own; the nudge makes the
    // step come without a round trip through the reactor. (It was first a
    // workaround for io_uring loops, whose registered eventfd lost wake-ups
    // on Linux 6.18; a driven loop is on epoll now, see driven_loop_options.)
    void nudge() noexcept;
    [[nodiscard]] bool wanted() const noexcept {
        // acquire: pairs with the acq_rel changes, so a driver that sees
        // demand also sees what the operation did before counting itself.
        return count_.load(std::memory_order_acquire) > 0;
    }
    // Throws std::logic_error when another driver drives the loop.
    void attach(const std::shared_ptr<driver_core>& driver) {
        std::lock_guard lock{mutex_};
        if (!driver_.expired()) {
            throw std::logic_error("coproc::asio_driver: this event_loop already has a driver; one driver per loop");
        }
        driver_ = driver;
    }
    void detach() noexcept {
        std::lock_guard lock{mutex_};
        driver_.reset();
    }

private:
    std::shared_ptr<driver_core> driver() noexcept {
        std::lock_guard lock{mutex_};
        return driver_.lock();
    }
    std::atomic<std::size_t> count_{0};
    std::mutex mutex_;
    std::weak_ptr<driver_core> driver_; // mutex_
};

struct demand_table {
    std::mutex mutex;
    std::vector<std::pair<const event_loop*, std::weak_ptr<loop_demand>>> entries;

    static std::shared_ptr<loop_demand> of(const event_loop& loop) {
        static demand_table table;
        std::lock_guard lock{table.mutex};
        for (auto& [key, weak] : table.entries) {
            if (key != &loop) continue;
            if (auto demand = weak.lock()) return demand;
            auto demand = std::make_shared<loop_demand>();
            weak = demand;
            return demand;
        }
        std::erase_if(table.entries, [](const auto& entry) { return entry.second.expired(); });
        auto demand = std::make_shared<loop_demand>();
        table.entries.emplace_back(&loop, demand);
        return demand;
    }
};

// Drives one event_loop from one io_context. States, on the io_context's
// thread:
//
//   idle --(demand 0 -> 1: kick posted)--> stepping: poll_ready()
//   stepping --(more ready)--> step posted again
//   stepping --(nothing ready, demand > 0)--> waiting: async_wait on the
//                                             loop's wake-up descriptor
//   stepping --(nothing ready, demand 0)--> idle
//   waiting --(readable, or cancelled while demand > 0)--> stepping
//   waiting --(demand -> 0: wait cancelled)--> idle
//   any --(driver destroyed, io_context shut down)--> closed
//
// Everything but `closed_` is touched on the io_context's thread only;
// `mutex_` guards `closed_` together with every post to the io_context, so
// that no post from another thread reaches an io_context being destroyed.
class driver_core : public std::enable_shared_from_this<driver_core> {
public:
    driver_core(asio::io_context& io, event_loop& loop) : io_(&io), loop_(&loop), demand_(demand_table::of(loop)) {
        // A duplicate: the loop keeps its descriptor, and the reactor's
        // registration stays valid however the two are destroyed.
        const int fd = ::fcntl(loop.wait_fd(), F_DUPFD_CLOEXEC, 0);
        if (fd < 0) {
            throw std::system_error(errno, std::generic_category(),
                                    "coproc::asio_driver: cannot duplicate the loop's wake-up descriptor");
        }
        try {
            wake_.emplace(io, fd);
        } catch (...) {
            ::close(fd);
            throw;
        }
    }

    [[nodiscard]] const std::shared_ptr<loop_demand>& demand() const noexcept { return demand_; }

    // io thread, once: becomes the loop's driver and takes a first step.
    void start() {
        demand_->attach(shared_from_this());
        kick();
    }
    // Any thread.
    void kick() noexcept { post_to_io(&driver_core::on_kick); }
    void idle() noexcept { post_to_io(&driver_core::on_idle); }

    // io thread: the driver is destroyed, or its io_context shuts down.
    void close() noexcept {
        {
            std::lock_guard lock{mutex_};
            if (closed_) return;
            closed_ = true;
        }
        demand_->detach();
        // Destroying the descriptor cancels the wait; its handler sees
        // closed_ and does nothing.
        wake_.reset();
    }

private:
    void post_to_io(void (driver_core::*member)()) noexcept {
        std::lock_guard lock{mutex_};
        if (closed_) return;
        try {
            asio::post(*io_, [self = shared_from_this(), member] { (self.get()->*member)(); });
        } catch (...) {
            // Out of memory: the next operation kicks again.
        }
    }

    bool is_closed() noexcept {
        std::lock_guard lock{mutex_};
        return closed_;
    }

    // A kick steps the loop soon, even while a wait is pending (the wait is
    // cancelled, and its handler steps): see loop_demand::nudge.
    void on_kick() {
        if (step_queued_) return;
        if (waiting_) {
            wake_->cancel();
            return;
        }
        step();
    }
    void on_idle() {
        if (waiting_ && !demand_->wanted() && wake_) wake_->cancel();
    }

    void step() {
        step_queued_ = false;
        if (is_closed()) return;
        const bool more = loop_->poll_ready(); // may close this driver (a coroutine destroyed it)
        if (is_closed()) return;
        if (more) {
            step_queued_ = true;
            post_to_io(&driver_core::step);
            return;
        }
        // The loop's contract: after poll_ready() returned false, a wait
        // started at once, in this handler, misses no wake-up.
        if (demand_->wanted()) arm();
    }

    void arm() {
        waiting_ = true;
        wake_->async_wait(asio::posix::stream_descriptor::wait_read, [self = shared_from_this()](const std::error_code& ec) {
            self->waiting_ = false;
            if (self->is_closed()) return;
            if (ec && !self->demand_->wanted()) return; // cancelled by the last release: idle
            self->step();
        });
    }

    asio::io_context* io_;
    event_loop* loop_;
    std::shared_ptr<loop_demand> demand_;
    std::optional<asio::posix::stream_descriptor> wake_;
    std::mutex mutex_;
    bool closed_ = false;      // mutex_
    bool waiting_ = false;     // io thread
    bool step_queued_ = false; // io thread
};

inline void loop_demand::acquire() noexcept {
    if (count_.fetch_add(1, std::memory_order_acq_rel) != 0) return;
    if (auto driving = driver()) driving->kick();
}

inline void loop_demand::nudge() noexcept {
    if (auto driving = driver()) driving->kick();
}

inline void loop_demand::release() noexcept {
    if (count_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
    if (auto driving = driver()) driving->idle();
}

// One unit of demand on a loop, from an operation's start until its
// handler is posted. Thread-safe: the loop's thread resets it when the
// operation completes while the initiating thread, or a cancellation, may
// still nudge through it (ThreadSanitizer saw that race).
class driver_ticket {
public:
    driver_ticket() noexcept = default;
    explicit driver_ticket(const event_loop& loop) : demand_(demand_table::of(loop)) { demand_->acquire(); }
    driver_ticket(driver_ticket&& other) noexcept : demand_(other.take()) {}
    driver_ticket& operator=(driver_ticket&&) = delete;
    ~driver_ticket() { reset(); }
    void nudge() const noexcept {
        std::shared_ptr<loop_demand> demand;
        {
            std::lock_guard lock{mutex_};
            demand = demand_;
        }
        if (demand) demand->nudge();
    }
    void reset() noexcept {
        if (auto demand = take()) demand->release();
    }

private:
    std::shared_ptr<loop_demand> take() noexcept {
        std::lock_guard lock{mutex_};
        return std::move(demand_);
    }
    mutable std::mutex mutex_;
    std::shared_ptr<loop_demand> demand_; // mutex_
};

// --- operations
//
// One outstanding operation keeps its handler here, registered with the
// execution context of the handler's executor:
//
//   initiated --(task final: complete() posts the handler)--> completed
//       |
//       +--(the context shuts down: handler destroyed, task cancelled)--> abandoned
//       +--(destroyed unfinished: the loop died)--> completed with operation_aborted
//
// The registry's mutex guards every operation's handler and work guard, so
// that a completion on the loop's thread and the context's shutdown on
// another never both take the handler, and no post reaches a context whose
// shutdown has begun.

class operation_base;

struct handler_box_base {
    virtual ~handler_box_base() = default;
};

template <class Handler>
struct handler_box final : handler_box_base {
    explicit handler_box(Handler&& h) : handler(std::move(h)) {}
    Handler handler;
};

class operation_registry {
public:
    std::mutex mutex;

    // Under `mutex`.
    [[nodiscard]] bool shut_down() const noexcept { return shut_down_; }
    void link(operation_base* operation) noexcept;
    void unlink(operation_base* operation) noexcept;

    // The execution context shuts down (io_context destroyed): every
    // outstanding handler is destroyed, outside the lock (destroying a
    // coroutine's handler may destroy other operations), and its task
    // cancelled. Drivers on this context close.
    void shut_down_now() noexcept;

    void add_driver(std::weak_ptr<driver_core> driver) {
        std::lock_guard lock{mutex};
        drivers_.push_back(std::move(driver));
    }

private:
    operation_base* first_ = nullptr;
    bool shut_down_ = false;
    std::vector<std::weak_ptr<driver_core>> drivers_;
};

class operation_base : public std::enable_shared_from_this<operation_base> {
public:
    virtual ~operation_base() = default;
    // The cancellation slot's request, on the thread that emits it.
    virtual void request_cancel(asio::cancellation_type type) noexcept = 0;

protected:
    friend class operation_registry;
    // Under the registry's mutex: gives up the handler (and the work).
    virtual std::unique_ptr<handler_box_base> abandon_locked() noexcept = 0;
    // After abandon_locked, outside the lock: cancels the task.
    virtual void after_abandon() noexcept = 0;

    operation_base* previous_ = nullptr;
    operation_base* next_ = nullptr;
    bool linked_ = false;
};

inline void operation_registry::link(operation_base* operation) noexcept {
    operation->previous_ = nullptr;
    operation->next_ = first_;
    if (first_) first_->previous_ = operation;
    first_ = operation;
    operation->linked_ = true;
}

inline void operation_registry::unlink(operation_base* operation) noexcept {
    if (!operation->linked_) return;
    if (operation->previous_) operation->previous_->next_ = operation->next_;
    else first_ = operation->next_;
    if (operation->next_) operation->next_->previous_ = operation->previous_;
    operation->previous_ = operation->next_ = nullptr;
    operation->linked_ = false;
}

inline void operation_registry::shut_down_now() noexcept {
    std::vector<std::shared_ptr<operation_base>> abandoned;
    std::vector<std::unique_ptr<handler_box_base>> handlers;
    std::vector<std::weak_ptr<driver_core>> drivers;
    {
        std::lock_guard lock{mutex};
        shut_down_ = true;
        drivers.swap(drivers_);
        while (operation_base* operation = first_) {
            unlink(operation);
            // Null while the operation's destructor waits for this mutex:
            // it then finds its handler gone... or here, still there: take it.
            auto owner = operation->weak_from_this().lock();
            try {
                if (owner) abandoned.push_back(std::move(owner));
            } catch (...) {
                // Out of memory: its handler is still destroyed below.
            }
            auto handler = operation->abandon_locked();
            try {
                handlers.push_back(std::move(handler));
            } catch (...) {
                // Destroyed here, under the lock, as a last resort.
            }
        }
    }
    handlers.clear();
    for (auto& operation : abandoned) operation->after_abandon();
    abandoned.clear();
    for (auto& weak : drivers) {
        if (auto driver = weak.lock()) driver->close();
    }
}

// The registry of one execution context, as an Asio service, so that it
// learns when the context shuts down.
class registry_service final : public asio::execution_context::service {
public:
    using key_type = registry_service;
    inline static asio::execution_context::id id;

    explicit registry_service(asio::execution_context& context)
        : asio::execution_context::service(context), registry_(std::make_shared<operation_registry>()) {}

    [[nodiscard]] const std::shared_ptr<operation_registry>& registry() const noexcept { return registry_; }

private:
    void shutdown() override { registry_->shut_down_now(); }

    std::shared_ptr<operation_registry> registry_;
};

template <class Executor>
std::shared_ptr<operation_registry> registry_of(const Executor& executor) {
    return asio::use_service<registry_service>(context_of(executor)).registry();
}

// What is posted to the handler's executor: clears the cancellation slot,
// then calls the handler. Carries the handler's allocator.
template <class Handler, class... Values>
struct completion {
    Handler handler;
    std::exception_ptr error;
    std::tuple<Values...> values;

    using allocator_type = asio::associated_allocator_t<Handler>;
    allocator_type get_allocator() const noexcept { return asio::get_associated_allocator(handler); }

    void operator()() {
        asio::get_associated_cancellation_slot(handler).clear();
        std::apply([this](auto&... value) { std::move(handler)(std::move(error), std::move(value)...); }, values);
    }
};

// The cancellation slot's handler: holds the operation weakly, so that the
// slot (which lives in the caller's frame or signal) never keeps it alive.
struct cancel_request {
    std::weak_ptr<operation_base> operation;
    void operator()(asio::cancellation_type type) const noexcept {
        if (auto alive = operation.lock()) alive->request_cancel(type);
    }
};

template <class... Values>
struct first_or_void {
    using type = void;
};
template <class Value>
struct first_or_void<Value> {
    using type = Value;
};

// How an operation reacts to its cancellation slot.
enum class cancel_target : unsigned char {
    task,      // a pool future: async_submit
    coroutine, // a coroutine on the loop, stopped through its token: async_map, async_shutdown
};

template <class Handler, class... Values>
class operation final : public operation_base {
public:
    using executor_type = asio::associated_executor_t<Handler>;
    using value_type = typename first_or_void<Values...>::type;

    operation(Handler&& handler, const event_loop& loop, cancel_target target)
        : executor_(asio::get_associated_executor(handler)), registry_(registry_of(executor_)), ticket_(loop),
          target_(target) {
        work_.emplace(executor_);
        handler_ = std::make_unique<handler_box<Handler>>(std::move(handler));
        std::lock_guard lock{registry_->mutex};
        registry_->link(this);
    }

    // The loop died with the operation unfinished (its done callback or
    // coroutine was destroyed unrun): the handler still gets an answer.
    ~operation() override {
        fail(std::make_exception_ptr(std::system_error(
            asio::error::operation_aborted, "coproc: the event loop was destroyed before the operation completed")));
        std::lock_guard lock{registry_->mutex};
        registry_->unlink(this);
    }

    // Before anything can complete the operation: connects the slot.
    void install_cancellation(asio::cancellation_slot slot) {
        if (slot.is_connected()) slot.template emplace<cancel_request>(cancel_request{weak_from_this()});
    }

    void set_task(future<value_type> task) { task_.emplace(std::move(task)); }
    [[nodiscard]] std::stop_token stop_token() const noexcept { return stop_.get_token(); }

    // Registers the completion with the task (which may call it at once).
    void watch_task() {
        task_->add_done_callback([self = std::static_pointer_cast<operation>(shared_from_this())](const auto&) {
            self->finish_from_task();
        });
        ticket_.nudge();
    }
    void nudge() const noexcept { ticket_.nudge(); }

    // Posts the handler with this outcome, unless it was already posted or
    // destroyed. Any thread.
    void complete(std::exception_ptr error, Values... values) noexcept {
        std::unique_lock lock{registry_->mutex};
        if (!handler_) return;
        registry_->unlink(this);
        auto box = std::move(handler_);
        try {
            asio::post(executor_, completion<Handler, Values...>{std::move(box->handler), std::move(error),
                                                                 std::tuple<Values...>{std::move(values)...}});
        } catch (...) {
            // Out of memory: the handler is destroyed uncalled.
        }
        // After the post, which counts as work on the executor itself.
        work_.reset();
        lock.unlock();
        box.reset();
        ticket_.reset();
    }

    void fail(std::exception_ptr error) noexcept { complete(std::move(error), Values{}...); }

    void request_cancel(asio::cancellation_type type) noexcept override {
        using ct = asio::cancellation_type;
        const bool terminal = (type & ct::terminal) != ct::none;
        const bool stop_it = terminal || (type & ct::partial) != ct::none;
        const bool before_start = (type & ct::total) != ct::none;
        try {
            if (target_ == cancel_target::task) {
                if (!task_ || task_->done()) return;
                if (terminal || (before_start && !task_->running())) {
                    task_->cancel(); // a running task: stop token, then a kill after cancel_grace
                } else if (stop_it) {
                    task_->request_stop(); // partial: the stop token only, never a kill
                }
            } else if (stop_it) {
                stop_.request_stop();
            }
            ticket_.nudge();
        } catch (...) {
            // Out of memory while queueing the cancellation: the task runs on.
        }
    }

private:
    void finish_from_task() noexcept {
        std::exception_ptr error;
        if constexpr (std::is_void_v<value_type>) {
            try {
                std::move(*task_).get(); // final: does not block
            } catch (...) {
                error = asio_error_of(std::current_exception());
            }
            complete(std::move(error));
        } else {
            std::optional<value_type> value;
            try {
                value.emplace(std::move(*task_).get());
            } catch (...) {
                error = asio_error_of(std::current_exception());
            }
            if (value) complete(nullptr, std::move(*value));
            else fail(std::move(error));
        }
    }

    std::unique_ptr<handler_box_base> abandon_locked() noexcept override {
        work_.reset();
        return std::move(handler_);
    }

    void after_abandon() noexcept override {
        request_cancel(asio::cancellation_type::terminal);
        ticket_.reset();
    }

    executor_type executor_;
    std::shared_ptr<operation_registry> registry_;
    driver_ticket ticket_;
    cancel_target target_;
    std::optional<asio::executor_work_guard<executor_type>> work_; // registry_->mutex
    std::unique_ptr<handler_box<Handler>> handler_;                // registry_->mutex
    std::optional<future<value_type>> task_;
    std::stop_source stop_;
};

template <class Handler, class R>
using operation_for = std::conditional_t<std::is_void_v<R>, operation<std::decay_t<Handler>>,
                                         operation<std::decay_t<Handler>, std::conditional_t<std::is_void_v<R>, int, R>>>;

inline event_loop& loop_of(process_pool& pool) { return pool_loop(*pool_core_of(pool)); }

// Completes `op` with what `body` yields; runs on the loop.
template <class Operation, class R>
task<void> complete_from(task<R> body, std::shared_ptr<Operation> op) {
    std::exception_ptr error;
    if constexpr (std::is_void_v<R>) {
        try {
            co_await std::move(body);
        } catch (...) {
            error = asio_error_of(std::current_exception());
        }
        op->complete(std::move(error));
    } else {
        std::optional<R> value;
        try {
            value.emplace(co_await std::move(body));
        } catch (...) {
            error = asio_error_of(std::current_exception());
        }
        if (value) op->complete(nullptr, std::move(*value));
        else op->fail(std::move(error));
    }
}

// Spawns `body` on `loop` from any thread, under `token`.
template <class Operation>
void start_on_loop(event_loop& loop, task<void> body, const std::shared_ptr<Operation>& op) {
    try {
        auto holder = std::make_shared<task<void>>(std::move(body));
        loop.post([&loop, holder, token = op->stop_token()] { loop.spawn(std::move(*holder), token); });
        op->nudge();
    } catch (...) {
        op->fail(std::current_exception());
    }
}

template <auto F>
struct initiate_submit {
    process_pool* pool;

    template <class Handler, class... Args>
    void operator()(Handler&& handler, Args&&... args) const {
        using R = typename remote<F>::result;
        asio::cancellation_slot slot = asio::get_associated_cancellation_slot(handler);
        auto op = std::make_shared<operation_for<Handler, R>>(std::move(handler), loop_of(*pool), cancel_target::task);
        try {
            op->set_task(pool->template submit<F>(std::forward<Args>(args)...));
        } catch (...) {
            op->fail(std::current_exception());
            return;
        }
        op->install_cancellation(slot);
        op->watch_task();
    }
};

template <auto F>
struct initiate_map {
    process_pool* pool;

    template <class Handler, class Range>
    void operator()(Handler&& handler, Range&& inputs, map_options options) const {
        using R = std::vector<typename remote<F>::result>;
        asio::cancellation_slot slot = asio::get_associated_cancellation_slot(handler);
        event_loop& loop = loop_of(*pool);
        auto op = std::make_shared<operation_for<Handler, R>>(std::move(handler), loop, cancel_target::coroutine);
        std::optional<task<R>> body;
        try {
            body.emplace(pool->template map<F>(std::move(inputs), options)); // submits now
        } catch (...) {
            op->fail(asio_error_of(std::current_exception()));
            return;
        }
        op->install_cancellation(slot);
        start_on_loop(loop, complete_from(std::move(*body), op), op);
    }
};

template <class T>
task<std::optional<T>> next_item(stream<T>* items) {
    co_return co_await items->next();
}

template <class T>
struct initiate_next {
    process_pool* pool;
    stream<T>* items;

    template <class Handler>
    void operator()(Handler&& handler) const {
        asio::cancellation_slot slot = asio::get_associated_cancellation_slot(handler);
        event_loop& loop = loop_of(*pool);
        auto op = std::make_shared<operation_for<Handler, std::optional<T>>>(std::move(handler), loop,
                                                                            cancel_target::coroutine);
        op->install_cancellation(slot);
        start_on_loop(loop, complete_from(next_item(items), op), op);
    }
};

struct initiate_shutdown {
    process_pool* pool;

    template <class Handler>
    void operator()(Handler&& handler, shutdown_options options) const {
        asio::cancellation_slot slot = asio::get_associated_cancellation_slot(handler);
        event_loop& loop = loop_of(*pool);
        auto op = std::make_shared<operation_for<Handler, void>>(std::move(handler), loop, cancel_target::coroutine);
        op->install_cancellation(slot);
        start_on_loop(loop, complete_from(pool->shutdown(options), op), op);
    }
};

template <auto F, class Token, class... Args>
auto submit_with_token(process_pool& pool, Token&& token, Args&&... args) {
    using R = typename remote<F>::result;
    static_assert(std::is_void_v<R> || std::is_default_constructible_v<R>,
                  "coproc::async_submit<F>: F's result type must be default-constructible (the completion signature "
                  "void(std::exception_ptr, R) passes R{} with a failure)");
    return asio::async_initiate<Token, submit_signature<R>>(initiate_submit<F>{&pool}, token,
                                                            std::forward<Args>(args)...);
}

template <auto F, class Tuple, std::size_t... I>
auto submit_split(process_pool& pool, Tuple&& all, std::index_sequence<I...>) {
    constexpr std::size_t last = std::tuple_size_v<std::remove_reference_t<Tuple>> - 1;
    return submit_with_token<F>(pool, std::get<last>(std::move(all)), std::get<I>(std::move(all))...);
}

} // namespace detail::asio_bridge
