// Must NOT compile: submitting a function whose parameter type cereal cannot
// serialize. tests/check_compile_error.py expects coproc's message.
#include <coproc/coproc.hpp>

struct opaque {
    int handle = 0; // no serialize member
};

int use(opaque value) { return value.handle; }

void submit_it(coproc::process_pool& pool) { (void)pool.submit<use>(opaque{}); }
